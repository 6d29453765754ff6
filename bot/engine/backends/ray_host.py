"""The Ray actor that hosts one worker process on a GPU node (``WorkerHost``).

It runs the unchanged ``python -m bot.engine.worker`` as its child (Ray cannot interrupt a task running
in an actor; a child process can be cancelled at its next step and killed on a timeout) and relays the
worker protocol: the service sends messages, and long-polls ``next`` for the worker's. Job inputs
arrive as bytes into the node's ``InputCache``; each job runs in its own folder on the node, seeded
with what the service holds of its ``out_dir`` (a training's checkpoint from an earlier try); the jobs of
a batch each get their folder too, then go to the worker as one ``batch`` message. Files
come back as bytes with ``done`` (the results) and with ``yield`` (a training's checkpoint).

Imports nothing of Ray at module level: the service imports this module to hand it to Ray.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from bot.engine import worker_protocol as wp
from bot.engine.backends.base import query_gpu_memory_mb
from bot.engine.backends.shipping import Blob, InputCache, read_tree, unpack_params, write_tree
from bot.engine.worker_env import WORKER_SETTINGS, worker_environment

EXITED = "_exited"  # relay-only message: the worker process ended, with its exit code
NODE_MODELS_ENV = "FACECHAIN_MODELS_DIR"  # a node's own models_dir, when it has one
# Bumped whenever WorkerHost's methods change: a detached actor outlives the bot, so one reattached after an
# upgrade may run older code (version 1 had no run_batch) and is replaced.
HOST_PROTOCOL = 2


class WorkerHost:
    """Hosts one worker process; every method is called by the service through Ray."""

    def __init__(self, name: str, cache_bytes: int, root: str) -> None:
        self.name = name
        self._root = root  # the project folder on this node (the same image everywhere)
        base = Path(tempfile.gettempdir()) / "facechain-ray" / name
        self._cache = InputCache(base / "inputs", cache_bytes)
        self._jobs_dir = base / "jobs"
        self._proc: asyncio.subprocess.Process | None = None
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._jobs: dict[int, tuple[Path, dict[str, tuple[int, int]], set[str]]] = {}
        self._reader: asyncio.Task[None] | None = None

    # -- the service's calls -------------------------------------------------------------------
    async def describe(self, kind_needs: dict[str, list[list[str]]], models_dir: str,
                       model_paths: dict[str, str] | None = None) -> dict[str, Any]:
        """This node's id, its models_dir and the kinds whose models it has (see ``kinds_with_models``)."""
        import ray

        local_models = os.environ.get(NODE_MODELS_ENV) or models_dir
        return {"protocol": HOST_PROTOCOL, "node": ray.get_runtime_context().get_node_id(), "models_dir": local_models,
                "kinds": kinds_with_models(Path(local_models), kind_needs, model_paths),
                "gpu_memory_mb": query_gpu_memory_mb(os.environ.get("CUDA_VISIBLE_DEVICES", ""))}

    async def spawn(self, init: dict[str, Any], drop_env: list[str], cache_bytes: int) -> None:
        """Starts a fresh worker process (any earlier one is killed first) without this node's secrets:
        secret-named variables and `drop_env` (the names that hold secrets where the bot runs). Both come
        with each start, so a bot that reattaches to this actor brings its own."""
        self._cache.budget_bytes = cache_bytes
        await self.kill()
        if self._reader is not None:
            await asyncio.wait({self._reader}, timeout=5)
        self._outbox = asyncio.Queue()
        shutil.rmtree(self._jobs_dir, ignore_errors=True)
        self._jobs.clear()
        env = {k: v for k, v in worker_environment(os.environ).items() if k not in set(drop_env)}
        env.update(WORKER_SETTINGS)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (self._root, os.environ.get("PYTHONPATH")) if p)
        if init["device"] == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # Ray set it for a GPU actor; a CPU slot sees none
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot.engine.worker", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env=env, start_new_session=True, limit=wp.MAX_LINE, cwd=self._root,
        )
        self._proc = proc
        init = {**init, "models_dir": os.environ.get(NODE_MODELS_ENV) or init.get("models_dir", "models")}
        self._write(init)
        self._reader = asyncio.ensure_future(self._read(proc))

    async def missing(self, digests: list[str]) -> list[str]:
        """Which inputs this node has to be sent."""
        return self._cache.missing(digests)

    async def run(self, message: dict[str, Any], inputs: dict[str, Blob], seed: Blob) -> None:
        """Stores the inputs, prepares the job's folder (seeded with `seed`) and hands the job to the worker."""
        await self._store(inputs)
        params = await self._prepare(int(message["job"]), message["params"], seed)
        self._evict()
        self._write({**message, "params": params})

    async def run_batch(self, message: dict[str, Any], inputs: dict[str, Blob], seeds: list[Blob]) -> None:
        """Like ``run`` for the jobs of a ``batch`` message (`seeds` in its jobs' order): each gets its own
        folder, and the worker runs them in one pass."""
        await self._store(inputs)
        jobs = [{**job, "params": await self._prepare(int(job["job"]), job["params"], seed)}
                for job, seed in zip(message["jobs"], seeds, strict=True)]
        self._evict()
        self._write({**message, "jobs": jobs})

    async def send(self, message: dict[str, Any]) -> None:
        """Relays a message to the worker (cancel, resume, ping)."""
        self._write(message)

    async def close(self) -> None:
        """Closes the worker's stdin: it exits when idle."""
        if self._proc is not None and self._proc.stdin is not None and not self._proc.stdin.is_closing():
            self._proc.stdin.close()

    async def kill(self) -> None:
        """SIGKILLs the worker's process group."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)

    async def next(self, wait_s: float) -> list[dict[str, Any]]:
        """The worker's messages since the last call (waits up to `wait_s` for the first)."""
        out: list[dict[str, Any]] = []
        with contextlib.suppress(TimeoutError):
            out.append(await asyncio.wait_for(self._outbox.get(), wait_s))
        while not self._outbox.empty():
            out.append(self._outbox.get_nowait())
        return out

    async def cached(self) -> list[str]:
        """The input digests this node holds, least recently used first (tests, monitoring)."""
        return self._cache.digests()

    # -- jobs' folders -------------------------------------------------------------------------
    async def _store(self, inputs: dict[str, Blob]) -> None:
        for digest, blob in inputs.items():
            await asyncio.to_thread(self._cache.put, digest, blob)

    async def _prepare(self, job_id: int, packed: dict[str, Any], seed: Blob) -> dict[str, Any]:
        """Makes the job's folder (seeded with `seed`, which need not come back) and its params on this node."""
        folder = self._jobs_dir / str(job_id)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        seen: dict[str, tuple[int, int]] = {}
        await asyncio.to_thread(write_tree, folder, seed)
        read_tree(folder, seen)
        params, used = unpack_params(packed, self._cache, folder)
        params["out_dir"] = str(folder)
        self._jobs[job_id] = (folder, seen, used)
        return params

    def _evict(self) -> None:
        """Trims the input cache, keeping what the jobs on hand use."""
        self._cache.evict(keep=set().union(*(u for _, _, u in self._jobs.values())))

    # -- the worker's side ---------------------------------------------------------------------
    def _write(self, message: dict[str, Any]) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            return
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.write(wp.encode(message))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError, OSError):
                await self.kill()
                break
            if not line:
                break
            try:
                message = wp.decode(line)
            except ValueError:
                continue
            self._outbox.put_nowait(await asyncio.to_thread(self._relay, message))
        code = await proc.wait()
        self._outbox.put_nowait({"op": EXITED, "code": code})

    def _relay(self, message: dict[str, Any]) -> dict[str, Any]:
        """Adds the files the service needs to a job's message: results with done, a checkpoint with yield."""
        op = message["op"]
        job = self._jobs.get(int(message.get("job", -1))) if "job" in message else None
        if job is None:
            return message
        folder, seen, _ = job
        if op == wp.YIELD:
            message["files_back"] = read_tree(folder, seen)
        elif op == wp.DONE:
            result = message.get("result") or {}
            back: Blob = {}
            names: list[str] = []
            for name in result.get("files") or []:
                path = Path(name)
                rel = path.resolve().relative_to(folder.resolve()).as_posix() if path.resolve().is_relative_to(
                    folder.resolve()) else path.name
                back[rel] = path.read_bytes()
                names.append(rel)
            result["files"] = names
            meta = result.setdefault("meta", {})
            import ray

            meta.update(node=ray.get_runtime_context().get_node_id(), actor=self.name)
            message["files_back"] = back
            message["result"] = json.loads(json.dumps(result, default=str))
        if op in (wp.DONE, wp.ERROR, wp.CRASH, wp.CANCELLED):
            self._jobs.pop(int(message["job"]), None)
            shutil.rmtree(folder, ignore_errors=True)
        return message


def kinds_with_models(models_dir: Path, kind_needs: dict[str, list[list[str]]],
                      model_paths: dict[str, str] | None = None) -> list[str]:
    """The kinds whose every needed model resolves under `models_dir` (or through `model_paths`)."""
    from facechain_core.manifest import resolve

    def present(model: str, feature: str) -> bool:
        try:
            return resolve(models_dir, model, feature, model_paths).exists()
        except Exception:  # not installed, or unknown to this node's manifest
            return False

    return [kind for kind, needs in kind_needs.items() if all(present(m, f) for m, f in needs)]
