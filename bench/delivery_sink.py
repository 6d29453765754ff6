"""The job sink the service benches hand their scheduler: a future per job, resolved when it is delivered.

Import it from a bench in this folder (``from delivery_sink import DeliverySink``): a script's own folder is on
``sys.path``."""
from __future__ import annotations

import asyncio
import time
from typing import Any

from bot.storage import Artifact, Job


class DeliverySink:
    """A ``JobSink`` that resolves each job's future with the ``time.perf_counter()`` of its delivery; a failed
    job's future raises, so a bench awaiting it stops instead of waiting for ever."""

    def __init__(self) -> None:
        self.done: dict[int, asyncio.Future[float]] = {}

    def delivered_at(self, job_id: int) -> asyncio.Future[float]:
        """The future of the job's delivery time (made on first ask, by the bench or by the delivery)."""
        return self.done.setdefault(job_id, asyncio.get_running_loop().create_future())

    async def on_progress(self, job: Job, step: int, total: int, text: str | None) -> None:
        pass

    async def deliver(self, job: Job, artifacts: list[Artifact]) -> None:
        self.delivered_at(job.id).set_result(time.perf_counter())

    async def on_late(self, job: Job) -> None:
        pass

    async def on_failed(self, job: Job, error: dict[str, Any]) -> None:
        self.delivered_at(job.id).set_exception(RuntimeError(f"job {job.id} failed: {error}"))

    async def on_cancelled(self, job: Job) -> None:
        pass
