"""Runs a Scheduler with one slow job until SIGTERM, then stops it with a grace period.

Used by tests/test_scheduler.py: ``python tests/scheduler_driver.py DB DATA_DIR LEDGER GRACE_S [PARAMS_JSON]``
(extra job params, e.g. ``{"hang_at": 2}``).
Prints ``RUNNING <job id> <worker pid>`` once the job reports progress, ``STOPPED`` at the end.
"""
from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from bot.config import SchedulerSettings
from bot.engine.jobkinds import GENERATE, JobKind, JobKinds
from bot.engine.scheduler import Scheduler
from bot.storage import Artifact, Job, Storage
from handlers.protocols import Chat


class _Sink:
    def __init__(self) -> None:
        self.running = asyncio.Event()

    async def on_progress(self, job: Job, step: int, total: int, text: str | None) -> None:
        self.running.set()

    async def deliver(self, job: Job, artifacts: list[Artifact]) -> None:
        pass

    async def on_late(self, job: Job) -> None:
        pass

    async def on_failed(self, job: Job, error: dict) -> None:
        pass

    async def on_cancelled(self, job: Job) -> None:
        pass


async def main(db: Path, data_dir: Path, ledger: str, grace_s: float, extra: dict) -> None:
    kinds = JobKinds(())
    kinds.register(JobKind("slow", "facechain_core.devtools:SleepPipeline", GENERATE, 2, 60))
    sink = _Sink()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with Storage(db) as storage:
        scheduler = Scheduler(storage, kinds, SchedulerSettings(), data_dir=data_dir,
                              context={"models_dir": str(data_dir)}, sink=sink)
        await scheduler.start()
        submitted = await scheduler.submit(
            "test:1", "slow", {"steps": 20, "delay_s": 0.05, "ledger": ledger, "tag": "slow", **extra},
            Chat("test", "1", True),
        )
        await sink.running.wait()
        print("RUNNING", submitted.job_id, scheduler.worker_pids()[0], flush=True)
        await stop.wait()
        await scheduler.stop(grace_s)
    print("STOPPED", flush=True)


if __name__ == "__main__":
    extra_params = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], float(sys.argv[4]), extra_params))
