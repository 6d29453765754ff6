"""The seam between the scheduler and whatever runs the worker processes.

A backend owns *slots*: one worker process each (one per GPU, or the CPU), speaking the protocol of
``bot.engine.worker_protocol``. The scheduler decides what runs where and when (priority classes,
round-robin fairness, time-slicing, cancel, timeouts, delivery); a backend only starts processes,
carries messages both ways and reports a process that ended. It never knows about users or the
database, and the scheduler never knows whether a slot is a child process or a Ray actor.

``dispatch`` takes a list of jobs so a backend can run a batch in one go (cross-user batching).
"""
from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class SlotInfo:
    """What a slot is and can do; placement rules and the features check read it."""

    name: str  # "cuda:1", "cpu", "ray:<node>/gpu0" (logs, health)
    device: str  # what the pipelines see: "cuda:0" or "cpu"
    gpu_index: int | None = None  # the GPU's index on its machine
    gpu_memory_mb: int | None = None  # None: unknown
    labels: Mapping[str, str] = field(default_factory=dict)
    node: str = "local"
    # Job kinds whose models this slot has; None: every kind (not checked).
    kinds: frozenset[str] | None = None


@dataclass
class Slot:
    """One worker process's place; the backend replaces the process when it ends."""

    index: int
    info: SlotInfo
    gen: int = 0  # bumped at each (re)start of its process
    ready: bool = False
    was_ready: bool = False  # this process said "ready" at some point
    ready_event: asyncio.Event = field(default_factory=asyncio.Event)
    jobs: list[int] = field(default_factory=list)  # the scheduler's: outermost first, nested after its host
    doom: dict[int, str] = field(default_factory=dict)  # the scheduler's: job id -> why it had the process killed
    stopping: bool = False
    gone: bool = False  # lost for good (its node left the cluster): never dispatched to again
    heard: float = 0.0  # wall time of the process's last message
    memory: dict[str, int] = field(default_factory=dict)  # from its last pong, bytes
    pid: int | None = None  # of the live worker process (on its own machine)
    start_failures: int = 0  # deaths in a row before "ready"
    last_base: str = ""  # the scheduler's: what its last job kept resident (see Scheduler._choose_slot)

    @property
    def idle(self) -> bool:
        return self.ready and not self.jobs and not self.gone

    @property
    def device(self) -> str:
        return self.info.device


@dataclass(frozen=True)
class JobOrder:
    """One job as a backend ships it: the ``run`` message of the worker protocol."""

    job_id: int
    kind: str
    pipeline: str
    params: dict[str, Any]  # with "out_dir" (where the service wants the result files) and "job_id"
    preemptible: bool = False

    def message(self) -> dict[str, Any]:
        return {"op": "run", "job": self.job_id, "kind": self.kind, "pipeline": self.pipeline,
                "params": self.params, "preemptible": self.preemptible}


class BackendEvents(Protocol):
    """What a backend tells the scheduler. Called on the scheduler's event loop."""

    async def on_message(self, slot: Slot, message: dict[str, Any]) -> None:
        """A job's message from the worker: progress, yield, done, error, crash, cancelled."""

    async def on_exit(self, slot: Slot, code: int | None, killed_by_us: bool) -> None:
        """The slot's process ended (or its machine was lost): settle ``slot.jobs``. The backend
        restarts the process afterwards unless stopping or gone."""

    def wake(self) -> None:
        """Something changed (a slot became ready or was added): look for work."""


class Backend(Protocol):
    """Runs worker processes in slots."""

    slots: list[Slot]

    async def start(self, events: BackendEvents) -> None:
        """Starts every slot's process (returns once they were launched; ``ready_event`` says ready)."""

    async def stop(self) -> None:
        """Stops every slot: kills busy processes (their exit is reported), lets idle ones exit."""

    def abort(self) -> None:
        """Kills every process at once (a start that failed)."""

    async def dispatch(self, slot: Slot, orders: list[JobOrder]) -> None:
        """Sends jobs to the slot's worker; several form a batch. Inputs travel as the backend needs."""

    def cancel(self, slot: Slot, job_id: int) -> None:
        """Asks the worker to stop the job at its next progress step."""

    def resume(self, slot: Slot) -> None:
        """Answers a yield: the preemptible job goes on."""

    def kill(self, slot: Slot) -> None:
        """Kills the slot's worker process (a timeout, a stuck job); its exit is reported as usual."""

    def ping(self) -> None:
        """Asks every worker for a pong (liveness and memory)."""


def init_message(context: Mapping[str, Any], device: str, memory_budget_mb: int = 0) -> dict[str, Any]:
    """The worker's ``init`` message for a slot whose pipelines see `device`."""
    import logging

    return {
        "op": "init", "models_dir": str(context.get("models_dir", "models")), "device": device,
        "dtype": context.get("dtype") or ("float16" if device.startswith("cuda") else "float32"),
        "memory_budget_mb": int(memory_budget_mb or context.get("memory_budget_mb", 0)),
        "settings": context.get("settings") or {},
        "log_level": context.get("log_level", logging.getLevelName(logging.getLogger().getEffectiveLevel())),
        "log_format": context.get("log_format", "text"),
    }


def query_gpu_memory_mb(index: str) -> int | None:
    """The memory of GPU `index` (as nvidia-smi numbers it) in MB; None without nvidia-smi or a GPU."""
    import shutil
    import subprocess

    index = index.split(",")[0].strip()
    if not index or not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", index],
                             capture_output=True, text=True, timeout=10, check=True)
        return int(out.stdout.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
