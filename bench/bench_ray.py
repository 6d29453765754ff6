"""The Ray backend against the local one, with the devtools SleepPipeline (no models).

1. Per-job overhead: zero-work jobs one at a time, submit -> delivered minus the time inside the
   pipeline, on one local worker process and on one Ray worker actor.
2. Throughput: jobs that each hold 200 ms of work, from several users at once, on 1 and 2 Ray actors
   (two nodes of a ``ray.cluster_utils.Cluster`` on this machine, a custom resource standing in for a GPU).

Run: ``.venv/bin/python bench/bench_ray.py`` (needs the ray extra: ``pip install '.[ray]'``).
"""
from __future__ import annotations

import asyncio
import logging
import statistics
import tempfile
import time
from pathlib import Path

from bot.config import SchedulerSettings
from bot.engine.backends import create_backend
from bot.engine.jobkinds import GENERATE, JobKind, JobKinds
from bot.engine.scheduler import Scheduler
from bot.storage import Storage
from delivery_sink import DeliverySink
from handlers.protocols import Chat

PIPELINE = "facechain_core.devtools:SleepPipeline"
CHAT = Chat("bench", "1", True)
GPU = "bench_gpu"
SEQUENTIAL_JOBS = 60
WORK_S = 0.2
BURST_JOBS = 20
USERS = 10


def _scheduler(storage: Storage, root: Path, sink: DeliverySink, backend: str, labels: dict[str, str]) -> Scheduler:
    kinds = JobKinds(())
    kinds.register(JobKind("bench", PIPELINE, GENERATE, 1, 60))
    settings = SchedulerSettings(queue_max=100_000, user_max_queued=100_000, backend=backend,  # type: ignore[arg-type]
                                 ray_gpu_resource=GPU, ray_namespace="facechain-bench", ray_node_labels=labels)
    context = {"models_dir": str(root), "log_level": "WARNING"}
    engine = create_backend(settings, context, data_dir=root / "data", devices=["cpu"], kind_needs=kinds.needs())
    return Scheduler(storage, kinds, settings, data_dir=root / "data", context=context, sink=sink, backend=engine)


async def overhead_ms(root: Path, backend: str) -> list[float]:
    sink = DeliverySink()
    labels = {"bench": "a"} if backend == "ray" else {}
    async with Storage(root / f"overhead-{backend}.sqlite3") as storage, \
            _scheduler(storage, root, sink, backend, labels) as sched:
        overheads = []
        for i in range(SEQUENTIAL_JOBS + 5):
            started = time.perf_counter()
            submitted = await sched.submit(f"bench:{i % USERS}", "bench", {"steps": 0}, CHAT)
            delivered = await sink.delivered_at(submitted.job_id)
            job = await storage.job(submitted.job_id)
            if i >= 5:  # the first jobs warm up the worker
                overheads.append((delivered - started - job.result["meta"]["run_s"]) * 1000)
    return sorted(overheads)


async def throughput(root: Path, labels: dict[str, str]) -> float:
    sink = DeliverySink()
    async with Storage(root / f"burst-{len(labels)}.sqlite3") as storage, \
            _scheduler(storage, root, sink, "ray", labels) as sched:
        started = time.perf_counter()
        submitted = [await sched.submit(f"bench:{i % USERS}", "bench", {"steps": 1, "delay_s": WORK_S}, CHAT)
                     for i in range(BURST_JOBS)]
        await asyncio.gather(*(sink.delivered_at(s.job_id) for s in submitted))
        return BURST_JOBS / (time.perf_counter() - started)


async def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {GPU: 1}, "labels": {"bench": "a"}})
    cluster.add_node(num_cpus=1, resources={GPU: 1}, labels={"bench": "b"})
    ray.init(address=cluster.address, namespace="facechain-bench", log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            for backend in ("local", "ray"):
                ms = await overhead_ms(root, backend)
                print(f"per-job overhead, {backend}, 1 worker, {SEQUENTIAL_JOBS} zero-work jobs one at a time: "
                      f"median {statistics.median(ms):.1f} ms, p95 {ms[int(len(ms) * 0.95)]:.1f} ms")
            one = await throughput(root, {"bench": "a"})
            two = await throughput(root, {})
            print(f"throughput, ray, {BURST_JOBS} jobs of {WORK_S * 1000:.0f} ms from {USERS} users: "
                  f"1 actor {one:.2f} jobs/s, 2 actors {two:.2f} jobs/s ({two / one:.2f}x; ideal {1 / WORK_S:.0f} "
                  f"jobs/s per actor)")
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
