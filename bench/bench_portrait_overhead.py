"""Service overhead of a portrait job over the bare pipeline call, on tiny models (CPU).

Bare: ``PortraitPipeline.run`` in this process, warm. Service: the same job submitted to the
scheduler (row written, worker process, progress stream, artifacts stored, sink delivery), warm
worker; overhead = median(service) - median(bare).

Run: ``.venv/bin/python bench/bench_portrait_overhead.py [--runs N]``.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bot.config import SchedulerSettings
from bot.engine.jobkinds import BUILTIN_KINDS, JobKinds
from bot.engine.scheduler import Scheduler
from bot.storage import Storage
from delivery_sink import DeliverySink
from facechain_core.manifest import load_manifest
from facechain_core.pipeline import PipelineContext, QuietProgress
from facechain_core.portrait import PortraitPipeline
from facechain_core.styles import load_styles
from facechain_core.tiny import build_all, build_identity
from handlers.protocols import Chat

SETTINGS: dict[str, Any] = {"face_filter": False, "sampler_override": {"steps": 4, "width": 64, "height": 64},
                            "oversample": 1}


async def _measure(root: Path, models: Path, params: dict[str, Any], runs: int) -> tuple[list[float], list[float]]:
    """Alternates a bare call and a service job, so load on the machine hits both alike."""
    paths = {e.name: str(models / e.path) for e in load_manifest().entries if (models / e.path).exists()}
    settings = {**SETTINGS, "model_paths": paths}
    pipeline = PortraitPipeline()
    pipeline.load(PipelineContext(models_dir=models, settings=settings))
    sink = DeliverySink()
    context = {"models_dir": str(models), "settings": settings, "log_level": "WARNING"}
    bare, service = [], []
    async with Storage(root / "bench.sqlite3") as storage, Scheduler(
            storage, JobKinds(BUILTIN_KINDS), SchedulerSettings(), data_dir=root / "data", context=context,
            sink=sink, devices=["cpu"]) as scheduler:
        for i in range(runs + 1):  # run 0 warms both up (the worker loads its pipeline)
            started = time.perf_counter()
            pipeline.run(dict(params, seed=i), QuietProgress())
            bare_s = time.perf_counter() - started
            started = time.perf_counter()
            submitted = await scheduler.submit("bench:1", "portrait", dict(params, seed=i), Chat("bench", "1", True))
            finished = await sink.delivered_at(submitted.job_id)
            if i:
                bare.append(bare_s)
                service.append(finished - started)
    pipeline.close()
    return bare, service


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = root / "models"
        build_all(models)
        style = load_styles().get("hanfu").model_dump(mode="json")
        params = {"style": style, "identity": str(build_identity(root / "identity.npz", 1)), "count": 1, "out_dir": str(root / "out")}
        bare, service = asyncio.run(_measure(root, models, params, args.runs))
    b, s = statistics.median(bare) * 1000, statistics.median(service) * 1000
    overhead = statistics.median(sv - bv for sv, bv in zip(service, bare)) * 1000
    print(f"portrait job on tiny models, 4 steps at 64x64, {args.runs} runs, CPU ({torch.get_num_threads()} torch threads):")
    print(f"  bare pipeline call: median {b:.1f} ms")
    print(f"  through the service (scheduler + worker process + storage + delivery): median {s:.1f} ms")
    print(f"  service overhead per job (median of paired differences): {overhead:.1f} ms")


if __name__ == "__main__":
    main()
