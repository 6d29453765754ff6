"""Time one SDXL identity-LoRA training step against one SD1.5 step (cached latents, the trainers of /train).

Builds the tiny SD1.5 and SDXL layouts (random weights) by default and trains both at the same resolution on
the same crops: on a CPU the absolute times mean little, the SDXL / SD1.5 ratio shows what SDXL's second text
encoder, added time ids and larger UNet cost per step. ``--full`` builds the full-size architectures (the SDXL
build writes about 14 GB of float32 weights: minutes of CPU) for real figures on ``--device cuda`` (float16
frozen weights, gradient checkpointing, as the worker runs them).

    python bench/bench_train_sdxl.py                          # tiny, CPU, 64 px
    python bench/bench_train_sdxl.py --full --device cuda --dtype float16 --resolution 1024
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from diffusers import DDPMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from facechain_core.pipeline import PipelineContext  # noqa: E402
from facechain_core.tiny import build_sd15, build_sdxl  # noqa: E402
from facechain_core.train_lora import LoraTrainer, TrainLoraPipeline, cache_inputs  # noqa: E402
from facechain_core.train_lora_sdxl import SdxlTrainLoraPipeline, cache_sdxl_inputs  # noqa: E402

PROMPT = "a photo of sks person"
N_IMAGES = 4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full-size architectures instead of tiny ones")
    parser.add_argument("--resolution", type=int, help="training resolution (default 64 tiny, 1024 full)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per family (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="frozen-weight dtype on a GPU (float16 there)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser.parse_args()


def step_times(pipe: TrainLoraPipeline, source: object, steps: int) -> list[float]:
    sd = pipe.base()
    scheduler = DDPMScheduler.from_config(sd.scheduler.config)
    device = sd.unet.device
    times = []
    with LoraTrainer(sd.unet, scheduler, rank=4, lr=1.5e-4, seed=0, mixed_precision=pipe.mixed_precision,
                     gradient_checkpointing=pipe.gradient_checkpointing) as trainer:
        trainer.train_step(source)  # type: ignore[arg-type]  (warm-up)
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            trainer.train_step(source)  # type: ignore[arg-type]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    resolution = args.resolution or (1024 if args.full else 64)
    pixels = torch.rand((N_IMAGES, 3, resolution, resolution), generator=torch.Generator().manual_seed(0)) * 2 - 1
    results = {}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        trainers = (("sd15", build_sd15, TrainLoraPipeline), ("sdxl", build_sdxl, SdxlTrainLoraPipeline))
        for family, build, cls in trainers:
            folder = build(scratch / family, full_size=args.full)
            pipe = cls()
            pipe.load(PipelineContext(models_dir=scratch, device=args.device, dtype=args.dtype,
                                      settings={"model_paths": {family: str(folder)}}))
            sd = pipe.base()
            source = (cache_inputs(sd.vae, sd.text_encoder, sd.tokenizer, pixels, PROMPT) if family == "sd15"
                      else cache_sdxl_inputs(sd, pixels, PROMPT, resolution))
            results[family] = statistics.median(step_times(pipe, source, args.steps))
            pipe.close()
    size = "full-size" if args.full else "tiny (absolute times mean little: read the ratio)"
    print(f"LoRA training step, cached latents, {resolution} px, {size}, {args.device} ({args.dtype}), "
          f"torch threads {torch.get_num_threads()}")
    for family in ("sd15", "sdxl"):
        print(f"{family}: median {results[family]:.3f} s/step")
    print(f"ratio SDXL / SD1.5: {results['sdxl'] / results['sd15']:.2f}")


if __name__ == "__main__":
    main()
