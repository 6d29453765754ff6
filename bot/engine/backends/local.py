"""The local backend: one worker process per configured device, children of the bot process.

Each process is ``python -m bot.engine.worker`` with the service's environment minus its secrets
(``bot.engine.worker_env``), in its own process group (a kill takes the pipelines' children too),
talking JSON lines over its stdin/stdout. A process that dies is started again, backing off when it
keeps dying before it is ready (a broken environment, not a job's fault).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.engine import worker_protocol as wp
from bot.engine.backends.base import BackendEvents, JobOrder, Slot, SlotInfo, batch_message, init_message
from bot.engine.worker_env import WORKER_SETTINGS, worker_environment

log = logging.getLogger(__name__)

WORKER_EXIT_WAIT_S = 5.0
# Restart delays after successive deaths before "ready" (a broken environment backs off).
RESPAWN_DELAYS_S = (0.0, 1.0, 5.0, 30.0)


def device_env(device: str) -> tuple[str, dict[str, str]]:
    """Maps a configured device to what the worker sees and its CUDA_VISIBLE_DEVICES."""
    if device.startswith("cuda"):
        index = device.partition(":")[2] or "0"
        return "cuda:0", {"CUDA_VISIBLE_DEVICES": index}
    return "cpu", {"CUDA_VISIBLE_DEVICES": ""}


@dataclass
class _Process:
    """The live process of a slot and the task reading it."""

    env: dict[str, str]
    proc: asyncio.subprocess.Process | None = None
    reader: asyncio.Task[None] | None = None
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def send(self, message: dict[str, Any]) -> None:
        """Writes to the worker; a dead worker's pipe is ignored (its exit is reported)."""
        if self.proc is None or self.proc.stdin is None or self.proc.stdin.is_closing():
            return
        try:
            self.proc.stdin.write(wp.encode(message))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def kill(self) -> None:
        """SIGKILLs the worker's process group (pipelines may have started children)."""
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def close_stdin(self) -> None:
        if self.proc is not None and self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()


class LocalBackend:
    """Worker processes on this machine, one per device (``"cuda:N"`` or ``"cpu"``)."""

    batches = True  # dispatch sends several orders as one batch message (one pass)

    def __init__(self, devices: list[str], context: Mapping[str, Any], *, secrets: Iterable[str] = (),
                 infos: list[SlotInfo] | None = None, memory_budgets_mb: list[int] | None = None) -> None:
        """`infos`: each device's capabilities (GPU memory, labels) when known; `memory_budgets_mb`: per device."""
        if not devices:
            raise ValueError("at least one device is needed")
        self._context = dict(context)
        self._events: BackendEvents | None = None
        self._stopping = False
        self._stop_event = asyncio.Event()  # wakes a restart waiting out its backoff
        root = str(Path(__file__).resolve().parents[3])
        self.slots: list[Slot] = []
        self._procs: list[_Process] = []
        self._budgets = memory_budgets_mb or [0] * len(devices)
        secrets = list(secrets)
        for index, configured in enumerate(devices):
            device, extra = device_env(configured)
            env = {**worker_environment(os.environ, secrets), **extra, **WORKER_SETTINGS}
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
            gpu = int(extra["CUDA_VISIBLE_DEVICES"]) if extra["CUDA_VISIBLE_DEVICES"] else None
            info = infos[index] if infos else SlotInfo(name=configured if gpu is not None else "cpu", device=device,
                                                       gpu_index=gpu)
            self.slots.append(Slot(index, info))
            self._procs.append(_Process(env))

    def environment(self, slot: Slot) -> dict[str, str]:
        """The environment the slot's worker process starts with."""
        return self._procs[slot.index].env

    async def start(self, events: BackendEvents) -> None:
        self._events = events
        self._stop_event = asyncio.Event()
        for slot in self.slots:
            await self._spawn(slot)

    async def stop(self) -> None:
        self._stopping = True
        self._stop_event.set()
        readers = [p.reader for p in self._procs if p.reader is not None]
        for slot, process in zip(self.slots, self._procs):
            slot.stopping = True
            if slot.jobs:
                process.kill()
            else:
                process.close_stdin()
        if readers:
            _, late = await asyncio.wait(readers, timeout=WORKER_EXIT_WAIT_S)
            if late:
                for process in self._procs:
                    process.kill()
                await asyncio.wait(late, timeout=WORKER_EXIT_WAIT_S)

    def abort(self) -> None:
        """Kills every process at once (a failed start)."""
        self._stopping = True
        for slot, process in zip(self.slots, self._procs):
            slot.stopping = True
            process.kill()

    async def dispatch(self, slot: Slot, orders: list[JobOrder]) -> None:
        # Several orders are one batch: the worker runs them in one pass (bot.engine.batching).
        self._procs[slot.index].send(orders[0].message() if len(orders) == 1 else batch_message(orders))

    def cancel(self, slot: Slot, job_id: int) -> None:
        self._procs[slot.index].send({"op": wp.CANCEL, "job": job_id})

    def resume(self, slot: Slot) -> None:
        self._procs[slot.index].send({"op": wp.RESUME})

    def kill(self, slot: Slot) -> None:
        self._procs[slot.index].kill()

    def ping(self) -> None:
        for process in self._procs:
            process.send({"op": wp.PING})

    # -- processes ---------------------------------------------------------------------------
    async def _spawn(self, slot: Slot) -> None:
        """Starts (or restarts) the slot's process and sends it the init message."""
        if self._stopping:
            return
        process = self._procs[slot.index]
        slot.gen += 1
        slot.ready = slot.was_ready = False
        slot.ready_event.clear()  # cleared, not replaced: the scheduler may be waiting on it
        slot.doom = {}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot.engine.worker", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env=process.env, start_new_session=True, limit=wp.MAX_LINE,
        )
        process.proc = proc
        slot.pid = proc.pid
        process.send(init_message(self._context, slot.device, self._budgets[slot.index]))
        process.reader = asyncio.ensure_future(self._read(slot, proc))
        process.reader.set_name(f"worker-{slot.index}-reader")
        if self._stopping:
            slot.stopping = True
            process.kill()

    async def _read(self, slot: Slot, proc: asyncio.subprocess.Process) -> None:
        """Handles one worker process's messages until it exits, then handles its exit."""
        assert proc.stdout is not None and self._events is not None
        process = self._procs[slot.index]
        while True:
            try:
                line = await proc.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                log.error("worker %d sent an over-long line: killing it", slot.index)
                process.kill()
                break
            except OSError:
                log.exception("reading worker %d failed: killing it", slot.index)
                process.kill()
                break
            if not line:
                break  # the process is exiting
            slot.heard = time.time()
            try:
                message = wp.decode(line)
            except ValueError:
                log.error("worker %d sent a bad line: %r", slot.index, line[:200])
                continue
            try:
                await self._on_message(slot, message)
            except Exception:
                log.exception("handling %r from worker %d failed", message.get("op"), slot.index)
        if process.proc is proc:
            slot.ready = False  # before the exit status arrives: dispatch nothing more to it
        code = await proc.wait()
        if process.proc is not proc:
            return
        slot.pid = None
        await self._on_exit(slot, proc.pid, code)

    async def _on_message(self, slot: Slot, message: dict[str, Any]) -> None:
        assert self._events is not None
        op = message["op"]
        if op == wp.PONG:
            slot.memory = {k: int(v) for k, v in (message.get("memory") or {}).items()}
        elif op == wp.READY:
            slot.ready = slot.was_ready = True
            slot.ready_event.set()
            self._events.wake()
        else:
            await self._events.on_message(slot, message)

    async def _on_exit(self, slot: Slot, pid: int, code: int) -> None:
        """Reports the exit (the scheduler settles the jobs), then restarts the process."""
        assert self._events is not None
        slot.ready = False
        killed_by_us = bool(slot.doom) or slot.stopping
        if not killed_by_us:
            log.warning("worker %d (pid %d) died (exit %s) while running %s", slot.index, pid, code, slot.jobs or "nothing")
        elif slot.jobs:
            log.info("worker %d (pid %d) stopped while running %s", slot.index, pid, slot.jobs)
        await self._events.on_exit(slot, code, killed_by_us)
        slot.doom = {}
        if self._stopping or slot.stopping:
            return
        # A worker that dies before it is ready is broken (not a job's fault): back off.
        slot.start_failures = 0 if slot.was_ready or killed_by_us else slot.start_failures + 1
        delay = RESPAWN_DELAYS_S[min(slot.start_failures, len(RESPAWN_DELAYS_S) - 1)]
        if delay:
            log.error("worker %d died before it was ready: respawning in %.0f s", slot.index, delay)
            await self._pause(delay)
        await self._respawn(slot)

    async def _respawn(self, slot: Slot) -> None:
        """Starts the slot's process again, retrying (with backoff) when the start itself fails."""
        for attempt in itertools.count():
            try:
                await self._spawn(slot)
                return
            except Exception:
                delay = RESPAWN_DELAYS_S[min(attempt + 1, len(RESPAWN_DELAYS_S) - 1)]
                log.exception("worker %d could not be started; trying again in %.1f s", slot.index, delay)
                await self._pause(delay)
                if self._stopping or slot.stopping:
                    return

    async def _pause(self, seconds: float) -> None:
        """Sleeps `seconds`, or less when the backend stops meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), seconds)
