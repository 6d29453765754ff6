"""A worker process for one device: ``python -m bot.engine.worker``, driven by the scheduler over a pipe.

The protocol (``bot.engine.worker_protocol``) runs on a duplicate of the original stdout; fd 1 and
``sys.stdout`` point at stderr, so a library that prints cannot corrupt it. A reader thread takes
stdin, so a cancel arrives while a job runs. Pipelines are imported lazily by import path and stay
resident. A preemptible job's ``progress.yield_point()`` asks the lead for short jobs and runs them
in place before going on.
"""
from __future__ import annotations

import gc
import importlib
import logging
import os
import queue
import sys
import threading
from pathlib import Path
from typing import Any, BinaryIO

from bot.engine import worker_protocol as wp
from facechain_core.errors import JobCancelled, UserFacingError
from facechain_core.pipeline import JobResult, Pipeline, PipelineContext

log = logging.getLogger("bot.engine.worker")


OUT_OF_MEMORY = "job.out_of_memory"  # the GPU ran out of memory even with smaller batches


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is torch's CUDA out-of-memory error (torch is only consulted when a pipeline loaded it)."""
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return oom is not None and isinstance(exc, oom)


class Channel:
    """Writes protocol messages to the lead, from any thread."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = wp.encode(message)
        with self._lock:
            try:
                self._stream.write(data)
                self._stream.flush()
            except BrokenPipeError:
                os._exit(0)  # the lead is gone: no one is left to take a result


def memory_usage() -> dict[str, int]:
    """This process's resident memory and, once a pipeline has used CUDA, the device's (bytes)."""
    usage: dict[str, int] = {}
    try:
        with open("/proc/self/statm") as statm:
            usage["rss"] = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    torch = sys.modules.get("torch")  # never imported for this: only report what is in use
    try:
        if torch is not None and torch.cuda.is_initialized():
            free, total = torch.cuda.mem_get_info()
            usage.update(cuda_allocated=torch.cuda.memory_allocated(), cuda_reserved=torch.cuda.memory_reserved(),
                         cuda_free=free, cuda_total=total)
    except Exception:  # a broken device must not stop the inbox thread: its job will report it
        log.debug("could not read CUDA memory", exc_info=True)
    return usage


class Inbox:
    """Reads the lead's messages on a thread: cancels are recorded and pings answered at once, the rest queued."""

    def __init__(self, stream: BinaryIO, channel: Channel | None = None) -> None:
        self._stream = stream
        self._channel = channel
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self.busy = False  # set while a job runs: an EOF then means the lead is gone
        self._thread = threading.Thread(target=self._read, name="worker-inbox", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            try:
                message = wp.decode(line)
            except ValueError:
                log.error("bad message from the lead: %r", line[:200])
                continue
            if message["op"] == wp.CANCEL:
                with self._lock:
                    self._cancelled.add(int(message["job"]))
            elif message["op"] == wp.PING:
                if self._channel is not None:
                    self._channel.send({"op": wp.PONG, "memory": memory_usage()})
            else:
                self._queue.put(message)
        # The lead closed our stdin (or died): no one is left to take a result.
        if self.busy:
            os._exit(0)
        self._queue.put(None)

    def get(self) -> dict[str, Any] | None:
        """Blocks for the next message; None once the lead closed the pipe."""
        return self._queue.get()

    def is_cancelled(self, job_id: int) -> bool:
        with self._lock:
            return job_id in self._cancelled

    def forget(self, job_id: int) -> None:
        with self._lock:
            self._cancelled.discard(job_id)


class JobProgress:
    """The ``Progress`` handed to a pipeline: streams steps, raises JobCancelled, yields."""

    def __init__(self, worker: Worker, job_id: int, preemptible: bool) -> None:
        self._worker = worker
        self.job_id = job_id
        self._preemptible = preemptible

    def _check(self) -> None:
        if self._worker.inbox.is_cancelled(self.job_id):
            raise JobCancelled(self.job_id)

    def __call__(self, step: int, total: int, text: str | None = None) -> None:
        self._check()
        self._worker.channel.send({"op": wp.PROGRESS, "job": self.job_id, "step": step, "total": total, "text": text})

    def yield_point(self) -> None:
        self._check()
        if self._preemptible:
            self._worker.serve_yield(self.job_id)
            self._check()


class Worker:
    """Runs jobs one at a time (short jobs nested inside a preemptible one), pipelines resident."""

    def __init__(self, channel: Channel, inbox: Inbox, context: PipelineContext) -> None:
        self.channel = channel
        self.inbox = inbox
        self.context = context
        self._pipelines: dict[str, Pipeline] = {}

    def pipeline(self, path: str) -> Pipeline:
        """Imports, builds and loads the pipeline at ``module:Class`` once."""
        pipeline = self._pipelines.get(path)
        if pipeline is None:
            module_name, _, class_name = path.partition(":")
            cls = getattr(importlib.import_module(module_name), class_name)
            pipeline = cls()
            log.info("loading pipeline %s on %s", path, self.context.device)
            pipeline.load(self.context)
            self._pipelines[path] = pipeline
        return pipeline

    def serve(self) -> None:
        """Runs jobs until the lead closes the pipe."""
        while (message := self.inbox.get()) is not None:
            if message["op"] == wp.RUN:
                self.inbox.busy = True
                try:
                    self.run_job(message, nested=False)
                finally:
                    self.inbox.busy = False
            elif message["op"] != wp.RESUME:
                log.warning("unexpected message %r", message["op"])

    def serve_yield(self, job_id: int) -> None:
        """At a checkpoint of `job_id`: runs the short jobs the lead sends until it says resume."""
        while True:
            self.channel.send({"op": wp.YIELD, "job": job_id})
            message = self.inbox.get()
            if message is None:
                os._exit(0)
            if message["op"] == wp.RESUME:
                return
            if message["op"] == wp.RUN:
                self.run_job(message, nested=True)
            else:
                log.warning("unexpected message %r during a yield", message["op"])

    def run_job(self, message: dict[str, Any], nested: bool) -> None:
        """Runs one job and reports how it ended; never raises."""
        job_id = int(message["job"])
        send = self.channel.send
        try:
            if self.inbox.is_cancelled(job_id):
                raise JobCancelled(job_id)
            params = message["params"]
            if params.get("out_dir"):
                Path(params["out_dir"]).mkdir(parents=True, exist_ok=True)
            pipeline = self.pipeline(message["pipeline"])
            progress = JobProgress(self, job_id, preemptible=bool(message.get("preemptible")) and not nested)
            result = self.run_within_memory(pipeline, params, progress)
            payload = result.to_dict() if isinstance(result, JobResult) else dict(result or {})
            send({"op": wp.DONE, "job": job_id, "result": payload})
        except JobCancelled:
            log.info("job %d cancelled", job_id)
            send({"op": wp.CANCELLED, "job": job_id})
        except UserFacingError as exc:
            log.info("job %d failed: %s", job_id, exc.code)
            send({"op": wp.ERROR, "job": job_id, "code": exc.code, "details": exc.details})
        except Exception as exc:
            log.exception("job %d (%s) crashed", job_id, message.get("kind"))
            send({"op": wp.CRASH, "job": job_id, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            self.inbox.forget(job_id)

    def run_within_memory(self, pipeline: Pipeline, params: dict[str, Any], progress: JobProgress) -> Any:
        """Runs the job; when the GPU runs out of memory, frees the resident pipelines and tries once more
        with ``params["low_memory"]`` (a pipeline then uses smaller batches), then fails with a clear code."""
        try:
            return pipeline.run(params, progress)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            log.warning("job %d: the GPU ran out of memory; freeing resident pipelines and trying with smaller batches",
                        progress.job_id)
        self.free_memory()
        try:
            return pipeline.run({**params, "low_memory": True}, progress)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            self.free_memory()
            raise UserFacingError(OUT_OF_MEMORY) from exc

    def free_memory(self) -> None:
        """Evicts every resident pipeline base and returns the freed memory to the device."""
        resident = self.context.shared.get("resident")
        if resident is not None:
            for key in list(resident.keys()):
                resident.evict(key)
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def close(self) -> None:
        for path, pipeline in self._pipelines.items():
            try:
                pipeline.close()
            except Exception:
                log.exception("closing pipeline %s failed", path)
        self._pipelines.clear()


def _take_protocol_stdout() -> BinaryIO:
    """Moves the protocol to a duplicate of fd 1 and points fd 1 and sys.stdout at stderr."""
    sys.stdout.flush()
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return protocol


def main() -> int:
    """Entry point of the worker process."""
    channel = Channel(_take_protocol_stdout())
    inbox = Inbox(sys.stdin.buffer, channel)
    inbox.start()
    init = inbox.get()
    if init is None or init.get("op") != wp.INIT:
        print(f"bot.engine.worker: expected an init message, got {init!r}", file=sys.stderr)
        return 2
    logging.basicConfig(
        stream=sys.stderr, level=init.get("log_level", "INFO"),
        format=f"%(asctime)s %(levelname)s worker[{init['device']} pid {os.getpid()}] %(name)s: %(message)s",
    )
    if init.get("log_format") == "json":
        from bot.ops.logsetup import JsonFormatter

        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter({"worker": init["device"], "pid": os.getpid()}))
    context = PipelineContext(
        models_dir=Path(init["models_dir"]), device=init["device"], dtype=init.get("dtype", "float32"),
        memory_budget_mb=int(init.get("memory_budget_mb", 0)), settings=init.get("settings") or {},
    )
    worker = Worker(channel, inbox, context)
    channel.send({"op": wp.READY, "pid": os.getpid()})
    try:
        worker.serve()
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
