"""Cross-user batching: pictures per second with 1, 2, 4 and 8 users each asking one portrait at once.

Every job goes through the service path (scheduler, one worker process, storage, delivery) on the tiny
SD1.5 models built by ``facechain_core.tiny`` (as bench_portrait_overhead does). For each number of
users: pictures per second with batching off (``batch_max = 1``) and on, the first user's time to result
against one user alone, every user's mean time to result (on / off), and a single job asking as many
pictures as the users together (the same batch in one job). ``--sizes`` runs the table at each picture size.
Figures are medians over ``--runs`` (``--stat min``: the fastest run, the least disturbed when other work
loads the machine, since load only adds time); on a CPU they are ratios to compare, not speeds to quote.

Run: ``.venv/bin/python bench/bench_batching.py [--runs 3] [--sizes 64] [--steps 4] [--batch-max 16] [--threads N]
[--stat median min]``.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Read when the libraries are imported, here and in the workers: no bars or notices between the figures.
os.environ.update(TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")

import torch  # noqa: E402

from bot.config import SchedulerSettings  # noqa: E402
from bot.engine.jobkinds import BUILTIN_KINDS, JobKinds  # noqa: E402
from bot.engine.scheduler import Scheduler  # noqa: E402
from bot.storage import Storage  # noqa: E402
from facechain_core.manifest import load_manifest  # noqa: E402
from facechain_core.styles import load_styles  # noqa: E402
from facechain_core.tiny import build_all, build_identity  # noqa: E402
from handlers.protocols import Chat  # noqa: E402

from delivery_sink import DeliverySink  # noqa: E402

USERS = (1, 2, 4, 8)


async def _round(scheduler: Scheduler, sink: DeliverySink, jobs: list[dict[str, Any]]) -> tuple[float, float, float]:
    """Submits the jobs at once (one user each); returns seconds until all are delivered, until the first user's
    is, and the users' mean."""
    started = time.perf_counter()
    submitted = await asyncio.gather(*(scheduler.submit(f"bench:{i}", "portrait", params, Chat("bench", str(i), True))
                                       for i, params in enumerate(jobs)))
    finished = [await sink.delivered_at(s.job_id) - started for s in submitted]
    return max(finished), finished[0], statistics.mean(finished)


async def _measure(root: Path, models: Path, settings: dict[str, Any], batch_max: int, jobs_for: Any,
                   runs: int) -> dict[str, list[tuple[float, float, float]]]:
    """Rows keyed "off users=N", "on users=N" and "one job=N" -> [(all delivered s, first user's s, mean s)] per run.

    One scheduler and one warm worker for all rounds, batching switched off and on between them, so a change
    in the machine's load hits both alike."""
    root.mkdir(parents=True, exist_ok=True)
    sink = DeliverySink()
    context = {"models_dir": str(models), "settings": settings, "log_level": "ERROR"}
    rows: dict[str, list[tuple[float, float, float]]] = {}
    async with Storage(root / "bench.sqlite3") as storage, Scheduler(
            storage, JobKinds(BUILTIN_KINDS), SchedulerSettings(batch_max=1, user_max_queued=50),
            data_dir=root / "data", context=context, sink=sink, devices=["cpu"]) as scheduler:
        await _round(scheduler, sink, jobs_for(1, 1))  # the worker loads its pipeline
        for run in range(runs + 1):  # run 0 warms every shape up
            for users in USERS:
                for key, limit, jobs in ((f"off users={users}", 1, jobs_for(users, 1)),
                                         (f"on users={users}", batch_max, jobs_for(users, 1)),
                                         (f"one job={users}", batch_max, jobs_for(1, users))):
                    scheduler.batch_max = limit
                    measured = await _round(scheduler, sink, jobs)
                    if run:
                        rows.setdefault(key, []).append(measured)
    return rows


def _table(rows: dict[str, list[tuple[float, float, float]]], size: int, args: argparse.Namespace, name: str) -> None:
    stat = min if name == "min" else statistics.median

    def median(key: str, part: int) -> float:
        return stat(r[part] for r in rows[key])

    alone = median("off users=1", 1)
    print(f"cross-user batching, tiny SD1.5 at {size}x{size}, {args.steps} steps, 2 candidates a portrait, "
          f"{name} of {args.runs} runs, CPU ({args.threads or torch.get_num_threads()} torch threads in the worker), "
          f"batch_max {args.batch_max} when on:")
    print("  users  pictures/s off  on     ratio  first user's time on / alone  mean user's time on / off"
          "  on / one job of as many pictures")
    for users in USERS:
        rate_off, rate_on = users / median(f"off users={users}", 0), users / median(f"on users={users}", 0)
        rate_one = users / median(f"one job={users}", 0)
        print(f"  {users:>5}  {rate_off:>14.2f}  {rate_on:<6.2f} {rate_on / rate_off:>5.2f}x  "
              f"{median(f'on users={users}', 1) / alone:>27.2f}x  "
              f"{median(f'on users={users}', 2) / median(f'off users={users}', 2):>24.2f}x  "
              f"{rate_on / rate_one:>31.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, choices=range(1, 100), metavar="N")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64], help="picture sides in pixels (a table each)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-max", type=int, default=16, help="samples per pass with batching on")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the worker (0: torch's default; 1 thrashes less on a busy machine)")
    parser.add_argument("--stat", choices=("median", "min"), nargs="+", default=["median"],
                        help="how runs are summed up (a table each)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by torch when the worker starts
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = root / "models"
        build_all(models)
        paths = {e.name: str(models / e.path) for e in load_manifest().entries if (models / e.path).exists()}
        style = load_styles().get("hanfu").model_dump(mode="json")
        identities = [str(build_identity(root / f"user{i}" / "identity.npz", seed=i)) for i in range(8)]

        def jobs_for(users: int, count: int) -> list[dict[str, Any]]:
            return [{"style": style, "identity": identities[i], "count": count, "seed": 100 + i} for i in range(users)]

        for size in args.sizes:
            settings = {"face_filter": False, "batch_size": 64, "model_paths": paths,
                        "sampler_override": {"steps": args.steps, "width": size, "height": size}}
            rows = asyncio.run(_measure(root / f"px{size}", models, settings, args.batch_max, jobs_for, args.runs))
            for name in args.stat:
                _table(rows, size, args, name)


if __name__ == "__main__":
    main()
