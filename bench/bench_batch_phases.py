"""Where a batched portrait pass spends its time, against the same jobs one by one (in one process, no service).

On the tiny SD1.5 models built by ``facechain_core.tiny``: N one-portrait jobs of different users run one by
one (``PortraitPipeline.run``), then as one pass (``run_batch``), then as one job asking N portraits, then one
job alone. Each phase is timed by wrapping the call that does it: the UNet's forward, the VAE decode, the
text encoder, the FaceID Plus image encoder, and a job's finish (rank, safety, PNG files). Figures are the
fastest of ``--runs`` (load on the machine only adds time).

Run: ``.venv/bin/python bench/bench_batch_phases.py [--jobs 4] [--sizes 32 64 128] [--threads 1] [--runs 5]``.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from facechain_core.manifest import load_manifest  # noqa: E402
from facechain_core.pipeline import PipelineContext, QuietProgress  # noqa: E402
from facechain_core.portrait import PortraitPipeline  # noqa: E402
from facechain_core.styles import load_styles  # noqa: E402
from facechain_core.tiny import build_all, build_identity  # noqa: E402

PHASES = ("unet", "vae decode", "text encoder", "image encoder", "finish")


def _timed(seconds: dict[str, float], owner: Any, name: str, phase: str) -> None:
    """Wraps ``owner.name`` so that its time adds to ``seconds[phase]``."""
    call = getattr(owner, name)

    @functools.wraps(call)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            seconds[phase] += time.perf_counter() - start
    setattr(owner, name, wrapper)


def _measure(root: Path, models: Path, size: int, jobs: int, runs: int) -> dict[str, tuple[float, dict[str, float]]]:
    """Per way of running ("one by one", "one pass", "one job", "alone"): (fastest total s, its phases)."""
    paths = {e.name: str(models / e.path) for e in load_manifest().entries if (models / e.path).exists()}
    settings = {"face_filter": False, "batch_size": 64, "model_paths": paths,
                "sampler_override": {"steps": 4, "width": size, "height": size}}
    portrait = PortraitPipeline()
    portrait.load(PipelineContext(models_dir=models, settings=settings))
    style = load_styles().get("hanfu").model_dump(mode="json")
    identities = [str(build_identity(root / f"u{i}/identity.npz", seed=i)) for i in range(jobs)]

    def job(i: int, count: int = 1) -> dict[str, Any]:
        return {"style": style, "identity": identities[i], "count": count, "seed": 100 + i,
                "out_dir": str(root / f"o{i}")}

    seconds: dict[str, float] = defaultdict(float)
    pipe = portrait.base("sd15").pipe
    _timed(seconds, pipe.unet, "forward", "unet")
    _timed(seconds, pipe.vae, "decode", "vae decode")
    _timed(seconds, pipe, "encode_prompt", "text encoder")
    _timed(seconds, pipe, "prepare_ip_adapter_image_embeds", "image encoder")
    _timed(seconds, portrait, "finish", "finish")
    ways: dict[str, Callable[[], Any]] = {
        "one by one": lambda: [portrait.run(job(i), QuietProgress()) for i in range(jobs)],
        "one pass": lambda: portrait.run_batch([(job(i), QuietProgress()) for i in range(jobs)]),
        "one job": lambda: portrait.run(job(0, jobs), QuietProgress()),
        "alone": lambda: portrait.run(job(0), QuietProgress()),
    }
    best: dict[str, tuple[float, dict[str, float]]] = {}
    for run in range(runs + 1):  # run 0 warms every shape up
        for name, way in ways.items():
            seconds.clear()
            start = time.perf_counter()
            way()
            total = time.perf_counter() - start
            if run and (name not in best or total < best[name][0]):
                best[name] = (total, dict(seconds))
    portrait.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=4, help="one-portrait jobs of different users")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128], help="picture sides in pixels")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    disable_progress_bars()
    print(f"{args.jobs} one-portrait jobs (2 candidates each), tiny SD1.5, 4 steps, CPU, {args.threads} torch "
          f"thread(s), fastest of {args.runs} runs; seconds:")
    print(f"  {'size':>4}  {'way':<10}  {'total':>6}  " + "  ".join(f"{p:>13}" for p in PHASES))
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        build_all(models)
        for size in args.sizes:
            best = _measure(Path(tmp) / f"px{size}", models, size, args.jobs, args.runs)
            for name, (total, phases) in best.items():
                print(f"  {size:>4}  {name:<10}  {total:>6.3f}  " + "  ".join(f"{phases.get(p, 0.0):>13.3f}"
                                                                            for p in PHASES))
            print(f"  {size:>4}  one by one / one pass: {best['one by one'][0] / best['one pass'][0]:.2f}x")


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
