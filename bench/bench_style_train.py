"""Time style LoRA training (/makestyle): whole-picture crops, one caption per picture, through the real trainer.

Builds an SD1.5 with random weights (facechain_core.tiny): the tiny one at 64 px by default (a quick CPU
figure), or the full-size architecture with --full (512 px by default; slow on a CPU). Prints the set-up
time (crops, latents and captions encoded once) and the seconds per training step.

    python bench/bench_style_train.py                       # tiny, 64 px, 20 steps, CPU
    python bench/bench_style_train.py --full --resolution 256 --steps 4
    python bench/bench_style_train.py --full --device cuda --dtype float16 --steps 50
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from facechain_core.pipeline import PipelineContext  # noqa: E402
from facechain_core.tiny import build_sd15  # noqa: E402
from facechain_core.train_lora import STAGE_TRAINING, TrainLoraPipeline  # noqa: E402

TRIGGER = "zwx style"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full-size SD1.5 architecture instead of the tiny one")
    parser.add_argument("--resolution", type=int, help="training resolution (default 64 tiny, 512 full)")
    parser.add_argument("--pictures", type=int, default=6, help="example pictures in the set")
    parser.add_argument("--steps", type=int, default=20, help="training steps timed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="frozen-weight dtype on GPU (float16 there)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--model-dir", type=Path, help="folder to build the model in, or reuse if it exists")
    return parser.parse_args()


class StepClock:
    """A progress callback that stamps each training step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, step: int, total: int, text: str | None = None) -> None:
        if text == STAGE_TRAINING:
            self.stamps.append(time.perf_counter())

    def yield_point(self) -> None:
        pass


def write_pictures(folder: Path, count: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(0)
    photos = []
    for index in range(count):
        blocks = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        path = folder / f"look{index}.png"
        Image.fromarray(blocks).resize((640, 480), Image.Resampling.NEAREST).save(path)
        photos.append({"path": str(path)})
    return photos


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    resolution = args.resolution or (512 if args.full else 64)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        model = args.model_dir or scratch / ("sd15-full" if args.full else "sd15-tiny")
        if not (model / "model_index.json").is_file():
            build_sd15(model, full_size=args.full)
        pipe = TrainLoraPipeline()
        started = time.perf_counter()
        pipe.load(PipelineContext(models_dir=scratch, device=args.device, dtype=args.dtype,
                                  settings={"model_paths": {"sd15": str(model)}}))
        loaded = time.perf_counter() - started
        photos = write_pictures(scratch, args.pictures)
        clock = StepClock()
        started = time.perf_counter()
        result = pipe.run({"photos": photos, "captions": [f"{TRIGGER}, look {i}" for i in range(len(photos))],
                           "crop": "whole", "trigger": TRIGGER, "out_dir": str(scratch / "out"),
                           "steps_per_photo": args.steps, "max_steps": args.steps, "resolution": resolution,
                           "checkpoint_every": max(args.steps, 1)}, clock)
        total = time.perf_counter() - started
        pipe.close()
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    setup = total - (clock.stamps[-1] - clock.stamps[0]) if clock.stamps else total
    print(f"style LoRA, {'full-size' if args.full else 'tiny'} SD1.5, {resolution} px, {args.pictures} pictures, "
          f"{args.device} ({torch.get_num_threads()} threads)")
    print(f"  base load            {loaded:8.2f} s")
    print(f"  set-up + first step  {setup:8.2f} s")
    if steps:
        print(f"  per step (median)    {statistics.median(steps):8.3f} s over {len(steps)} steps")
    print(f"  whole run            {total:8.2f} s, loss curve {result.meta['loss_curve']}")


if __name__ == "__main__":
    main()
