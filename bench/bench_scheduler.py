"""Scheduler overhead and throughput with the devtools SleepPipeline (no models).

1. Per-job overhead: one CPU worker, zero-work jobs submitted one at a time; submit -> delivered
   minus the time spent inside the pipeline.
2. Throughput: two simulated GPU workers (two CPU worker processes), a burst of jobs from many users.

Run: ``.venv/bin/python bench/bench_scheduler.py``.
"""
from __future__ import annotations

import asyncio
import logging
import statistics
import tempfile
import time
from pathlib import Path

from bot.config import SchedulerSettings
from bot.engine.jobkinds import GENERATE, JobKind, JobKinds
from bot.engine.scheduler import Scheduler
from bot.storage import Storage
from delivery_sink import DeliverySink
from handlers.protocols import Chat

PIPELINE = "facechain_core.devtools:SleepPipeline"
CHAT = Chat("bench", "1", True)
SEQUENTIAL_JOBS = 200
BURST_JOBS = 400
USERS = 20


def _scheduler(storage: Storage, root: Path, sink: DeliverySink, devices: list[str]) -> Scheduler:
    kinds = JobKinds(())
    kinds.register(JobKind("bench", PIPELINE, GENERATE, 1, 60))
    settings = SchedulerSettings(queue_max=100_000, user_max_queued=100_000)
    return Scheduler(storage, kinds, settings, data_dir=root / "data",
                     context={"models_dir": str(root), "log_level": "WARNING"}, sink=sink, devices=devices)


async def bench_overhead(root: Path) -> None:
    sink = DeliverySink()
    async with Storage(root / "overhead.sqlite3") as storage, _scheduler(storage, root, sink, ["cpu"]) as sched:
        overheads = []
        for i in range(SEQUENTIAL_JOBS):
            started = time.perf_counter()
            submitted = await sched.submit(f"bench:{i % USERS}", "bench", {"steps": 0}, CHAT)
            delivered = await sink.delivered_at(submitted.job_id)
            job = await storage.job(submitted.job_id)
            overheads.append((delivered - started - job.result["meta"]["run_s"]) * 1000)
    overheads.sort()
    print(f"per-job overhead, 1 CPU worker, {SEQUENTIAL_JOBS} zero-work jobs one at a time: "
          f"median {statistics.median(overheads):.2f} ms, mean {statistics.mean(overheads):.2f} ms, "
          f"p95 {overheads[int(len(overheads) * 0.95)]:.2f} ms")


async def bench_throughput(root: Path, work_s: float) -> None:
    sink = DeliverySink()
    name = f"burst-{work_s}.sqlite3"
    async with Storage(root / name) as storage, _scheduler(storage, root, sink, ["cpu", "cpu"]) as sched:
        started = time.perf_counter()
        params = {"steps": 1, "delay_s": work_s} if work_s else {"steps": 0}
        submitted = [await sched.submit(f"bench:{i % USERS}", "bench", params, CHAT) for i in range(BURST_JOBS)]
        await asyncio.gather(*(sink.delivered_at(s.job_id) for s in submitted))
        elapsed = time.perf_counter() - started
    ideal = f" (ideal {2 / work_s:.0f} jobs/s)" if work_s else ""
    print(f"throughput, 2 workers, {BURST_JOBS} jobs of {work_s * 1000:.0f} ms work from {USERS} users: "
          f"{BURST_JOBS / elapsed:.0f} jobs/s{ideal}")


async def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        await bench_overhead(root)
        await bench_throughput(root, 0.0)
        await bench_throughput(root, 0.02)


if __name__ == "__main__":
    asyncio.run(main())
