"""Test-only pipelines that exercise the scheduler and workers without any model.

``SleepPipeline`` params (all optional):

- ``steps`` (3), ``delay_s`` (0): report `steps` progress steps, sleeping `delay_s` before each.
- ``yield_every``: call ``progress.yield_point()`` after every k-th step (a preemptible job).
- ``ledger``: a file that gets one line ``<tag>`` appended per generation (proves nothing runs twice).
- ``tag``: the ledger line and output file stem (default: the job id).
- ``suffix`` (".txt"): the output file's suffix; the file lands in ``out_dir``.
- ``crash_at``: ``os._exit`` at that step; with ``crash_marker`` only while that file is missing
  (it is created first, so the next attempt passes).
- ``hang_at``: sleep forever at that step (for timeouts).
- ``pause_at`` with ``pause_dir``: at that step, unless ``<pause_dir>/<tag>.go`` exists, write
  ``<tag>.paused`` there (holding this process's pid) and wait until ``<tag>.go`` appears: a test can
  kill the worker, or the whole service, at a known point of a job (the ledger line is not written yet).
- ``fail_code`` (+ ``fail_details``): raise ``UserFacingError`` at the start.
- ``bug``: raise ``RuntimeError`` at the start.
- ``chatter``: print to stdout (Python and fd 1) at each step, as noisy libraries do.
- ``copy_from``: a file whose content is appended to the output file (an input that must reach the worker).
- ``out``: a second output file (outside ``out_dir``, as identity's) holding the tag.
- ``echo_params``: the result's meta holds the params the pipeline saw.
- ``oom_times``: raise ``torch.cuda.OutOfMemoryError`` on the first k runs without ``low_memory`` in this
  process (after loading a resident entry, so the worker's eviction shows); ``low_memory`` runs pass unless
  ``oom_always``.
- ``checkpoint``: at each yield point write ``out_dir/checkpoint/step.txt``; a run that finds one starts
  after that step (meta ``resumed_from``), as training does.

``run_batch`` runs several jobs' steps side by side (one sleep per step for the batch, as one denoising pass
would); a job joins a batch when it has ``batch_key`` (``sleep_batch_plan``; ``samples``, default 1). Each job
keeps its own failures, cancel, ``copy_from`` and files; the meta's ``batch`` lists the tags that shared its pass.

The result's meta holds ``pid``, ``device``, ``dtype``, ``cuda_visible_devices``, ``loads`` (times
``load`` ran in this process), ``run_s`` (seconds inside ``run``) and ``steps_done``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from facechain_core.errors import UserFacingError
from facechain_core.pipeline import JobResult, PipelineContext, Progress

CRASH_EXIT_CODE = 87


def _hang() -> None:
    while True:
        time.sleep(3600)


def _pause(folder: Path, tag: str) -> None:
    go = folder / f"{tag}.go"
    if go.exists():
        return
    marker = folder / f"{tag}.paused"
    marker.with_suffix(".part").write_text(str(os.getpid()))
    marker.with_suffix(".part").replace(marker)  # whole, or not there: a reader never sees it empty
    while not go.exists():
        time.sleep(0.01)


def _write_output(params: dict[str, Any], tag: str) -> Path:
    """The job's output file in its out_dir: its tag, then what ``copy_from`` holds."""
    out = Path(params["out_dir"]) / f"{tag}{params.get('suffix', '.txt')}"
    out.write_text(f"{tag}\n" + (Path(params["copy_from"]).read_text() if params.get("copy_from") else ""))
    return out


def _should_crash(params: dict[str, Any]) -> bool:
    marker = params.get("crash_marker")
    if not marker:
        return True
    path = Path(marker)
    if path.exists():
        return False
    path.touch()
    return True


def append_ledger(path: str | Path, line: str) -> None:
    """Appends one line in a single write (O_APPEND keeps concurrent writers whole)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def read_ledger(path: str | Path) -> list[str]:
    """Returns the ledger's lines (empty when it does not exist)."""
    path = Path(path)
    return path.read_text().splitlines() if path.exists() else []


class SleepPipeline:
    """Sleeps through progress steps and writes a small file; can crash, hang or fail on demand."""

    loads = 0  # per process: proves the pipeline stays resident between jobs
    ooms = 0  # out-of-memory errors raised in this process

    def load(self, context: PipelineContext) -> None:
        """Records the context; takes no time unless ``settings["devtools"]["load_delay_s"]`` says so."""
        type(self).loads += 1
        self.context = context
        time.sleep(float(context.settings.get("devtools", {}).get("load_delay_s", 0)))

    def run(self, params: dict[str, Any], progress: Progress) -> JobResult:
        """Runs the requested steps, then writes the output file and the ledger line."""
        started = time.perf_counter()
        # 1. Fail on demand.
        if params.get("fail_code"):
            raise UserFacingError(params["fail_code"], **params.get("fail_details", {}))
        if params.get("bug"):
            raise RuntimeError("devtools: a requested bug")
        self._maybe_run_out_of_memory(params)
        # 2. Steps.
        steps = int(params.get("steps", 3))
        delay = float(params.get("delay_s", 0))
        yield_every = int(params.get("yield_every", 0))
        tag = str(params.get("tag", params.get("job_id", "job")))
        checkpoint = Path(params["out_dir"]) / "checkpoint" / "step.txt"
        resumed_from = int(checkpoint.read_text()) if params.get("checkpoint") and checkpoint.exists() else 0
        for step in range(resumed_from + 1, steps + 1):
            if params.get("hang_at") == step:
                _hang()
            if params.get("pause_at") == step and params.get("pause_dir"):
                _pause(Path(params["pause_dir"]), tag)
            if params.get("crash_at") == step and _should_crash(params):
                os._exit(CRASH_EXIT_CODE)
            if delay:
                time.sleep(delay)
            if params.get("chatter"):
                print(f"devtools chatter {step}", flush=True)
                os.write(1, b"devtools raw chatter\n")
            progress(step, steps, f"step {step}/{steps}")
            if yield_every and step % yield_every == 0 and step < steps:
                if params.get("checkpoint"):
                    checkpoint.parent.mkdir(parents=True, exist_ok=True)
                    checkpoint.write_text(str(step))
                progress.yield_point()
        # 3. Output and ledger.
        files = [_write_output(params, tag)]
        if params.get("out"):
            Path(params["out"]).write_text(tag)
            files.append(Path(params["out"]))
        if params.get("ledger"):
            append_ledger(params["ledger"], tag)
        return JobResult(files=files, meta={
            "pid": os.getpid(), "device": self.context.device, "loads": type(self).loads,
            "run_s": time.perf_counter() - started, "steps_done": steps,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "dtype": self.context.dtype,
            "resumed_from": resumed_from, "memory_budget_mb": self.context.memory_budget_mb,
            "ooms": type(self).ooms, "low_memory": bool(params.get("low_memory")),
            "resident_builds": self.context.shared["resident"].loads["devtools-base"] if "resident" in self.context.shared else 0,
            **({"params": params} if params.get("echo_params") else {}),
        })

    def run_batch(self, jobs: list[tuple[dict[str, Any], Progress]]) -> list[JobResult | BaseException]:
        """Runs the jobs' steps together (one sleep per step); one outcome per job."""
        started = time.perf_counter()
        outcomes: list[JobResult | BaseException | None] = [None] * len(jobs)
        tags = [str(p.get("tag", p.get("job_id", "job"))) for p, _ in jobs]
        for index, (params, _) in enumerate(jobs):
            if params.get("fail_code"):
                outcomes[index] = UserFacingError(params["fail_code"], **params.get("fail_details", {}))
            elif params.get("bug"):
                outcomes[index] = RuntimeError("devtools: a requested bug")
        steps = [int(p.get("steps", 3)) for p, _ in jobs]
        delay = max(float(p.get("delay_s", 0)) for p, _ in jobs)
        for step in range(1, max(steps) + 1):
            live = [i for i in range(len(jobs)) if outcomes[i] is None and step <= steps[i]]
            if not live:
                break
            for i in live:
                params = jobs[i][0]
                if params.get("pause_at") == step and params.get("pause_dir"):
                    _pause(Path(params["pause_dir"]), tags[i])
                if params.get("crash_at") == step and _should_crash(params):
                    os._exit(CRASH_EXIT_CODE)
            if delay:
                time.sleep(delay)
            for i in live:
                try:
                    jobs[i][1](step, steps[i], f"step {step}/{steps[i]}")
                except Exception as exc:  # cancelled: only this job stops
                    outcomes[i] = exc
        batch = [tags[i] for i in range(len(jobs)) if outcomes[i] is None]
        for i, (params, _) in enumerate(jobs):
            if outcomes[i] is not None:
                continue
            out = _write_output(params, tags[i])
            if params.get("ledger"):
                append_ledger(params["ledger"], tags[i])
            outcomes[i] = JobResult(files=[out], meta={
                "pid": os.getpid(), "device": self.context.device, "loads": type(self).loads, "batch": batch,
                "run_s": time.perf_counter() - started, "steps_done": steps[i],
            })
        return [o if o is not None else RuntimeError("not run") for o in outcomes]

    def _maybe_run_out_of_memory(self, params: dict[str, Any]) -> None:
        if not params.get("oom_times") and not params.get("oom_always"):
            return
        import torch

        from facechain_core.resident import SHARED_KEY, ResidentPipelines

        resident = self.context.shared.setdefault(SHARED_KEY, ResidentPipelines(self.context.memory_budget_mb * 2**20))
        resident.get("devtools-base", lambda: torch.nn.Linear(4, 4))
        if params.get("oom_always") or (not params.get("low_memory") and type(self).ooms < int(params["oom_times"])):
            type(self).ooms += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (devtools)")

    def close(self) -> None:
        """Nothing to free."""


def sleep_batch_plan(params: dict[str, Any], settings: dict[str, Any]) -> tuple[str, int] | None:
    """A SleepPipeline job's batch plan: its ``batch_key`` and ``samples`` (1); None without a key."""
    key = params.get("batch_key")
    return None if key is None else (str(key), int(params.get("samples", 1)))
