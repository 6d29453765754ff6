"""Time one LoRA training step with cached vs live VAE latents and text embeddings.

Runs on the full-size SD1.5 architecture with random weights (built by facechain_core.tiny) at
512 px, on CPU unless --device says otherwise; --tiny uses the tiny model at 64 px for a quick check.

    python bench/bench_train_step.py                 # full size, 512 px, 2 timed steps per mode
    python bench/bench_train_step.py --tiny --steps 10
    python bench/bench_train_step.py --model-dir /tmp/sd15-full   # reuse (or keep) the built folder
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDPMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from facechain_core.pipeline import PipelineContext  # noqa: E402
from facechain_core.tiny import build_sd15  # noqa: E402
from facechain_core.train_lora import (  # noqa: E402
    InputSource,
    LoraTrainer,
    TrainLoraPipeline,
    cache_inputs,
    live_inputs,
)

PROMPT = "a photo of sks person"
N_IMAGES = 2  # photos in the set; with mirrored copies the source holds 2x this


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny SD1.5 at 64 px instead of full size at 512 px")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per mode (after one warm-up step each)")
    parser.add_argument("--resolution", type=int, help="training resolution (default 512, or 64 with --tiny)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="frozen-weight dtype on GPU (float16 there)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--model-dir", type=Path, help="folder to build the model in, or reuse if it exists")
    return parser.parse_args()


def ensure_model(args: argparse.Namespace, scratch: Path) -> Path:
    folder = args.model_dir or scratch / ("sd15-tiny" if args.tiny else "sd15-full")
    if not (folder / "model_index.json").is_file():
        started = time.perf_counter()
        build_sd15(folder, full_size=not args.tiny)
        print(f"built {'tiny' if args.tiny else 'full-size'} SD1.5 in {time.perf_counter() - started:.1f} s")
    return folder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CPU_SECONDS: list[float] = []  # process CPU time of each timed call, in call order


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Return fn's wall time; record its CPU time too (steadier when other work shares the cores)."""
    sync(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    CPU_SECONDS.append(time.process_time() - cpu_started)
    return time.perf_counter() - started


def time_steps(pipe: TrainLoraPipeline, sources: dict[str, InputSource], steps: int) -> dict[str, list[float]]:
    """Return per-source step times, the sources taking turns so machine noise hits both alike."""
    sd = pipe.base()
    scheduler = DDPMScheduler.from_config(sd.scheduler.config)
    times: dict[str, list[float]] = {name: [] for name in sources}
    times.update({f"{name}_cpu": [] for name in sources})
    with LoraTrainer(sd.unet, scheduler, rank=4, lr=1.5e-4, seed=0, mixed_precision=pipe.mixed_precision,
                     gradient_checkpointing=pipe.gradient_checkpointing) as trainer:
        for source in sources.values():
            trainer.train_step(source)  # warm-up: allocator, kernels, first autograd graph
        for _ in range(steps):
            for name, source in sources.items():
                times[name].append(timed(lambda: trainer.train_step(source), sd.device))
                times[f"{name}_cpu"].append(CPU_SECONDS[-1])
    return times


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    resolution = args.resolution or (64 if args.tiny else 512)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        folder = ensure_model(args, Path(scratch))
        pipe = TrainLoraPipeline()
        started = time.perf_counter()
        pipe.load(PipelineContext(models_dir=folder.parent, device=args.device, dtype=args.dtype,
                                  settings={"model_paths": {"sd15": str(folder)}}))
        print(f"loaded in {time.perf_counter() - started:.1f} s on {device} ({pipe.dtype}), "
              f"torch threads {torch.get_num_threads()}, {resolution} px, {2 * N_IMAGES} images with flips")
        sd = pipe.base()
        g = torch.Generator().manual_seed(0)
        pixels = torch.rand((2 * N_IMAGES, 3, resolution, resolution), generator=g) * 2 - 1

        holder: dict[str, InputSource] = {}
        cache_s = timed(lambda: holder.update(cached=cache_inputs(sd.vae, sd.text_encoder, sd.tokenizer, pixels,
                                                                  PROMPT)), device)
        live = live_inputs(sd.vae, sd.text_encoder, sd.tokenizer, pixels, PROMPT)
        encode_s = timed(lambda: live.sample(torch.tensor([0]), g), device)

        times = time_steps(pipe, {"cached": holder["cached"], "live": live}, args.steps)
        cached_s, live_s = statistics.median(times["cached"]), statistics.median(times["live"])
        saved = live_s - cached_s
        print(f"one-time cache of {len(pixels)} latents + prompt: {cache_s:.2f} s "
              f"({cache_s / len(pixels):.2f} s per image)")
        print(f"live encode of one image + prompt (VAE + text encoder): {encode_s:.3f} s")
        for name, label in (("cached", "cached inputs"), ("live", "live inputs  ")):
            runs = ", ".join(f"{t:.3f}" for t in times[name])
            cpu = statistics.median(times[f"{name}_cpu"])
            print(f"train step, {label}: median {statistics.median(times[name]):.3f} s/step wall, "
                  f"{cpu:.3f} CPU-s/step  ({runs})")
        print(f"caching saves {saved:.3f} s/step ({100 * saved / live_s:.1f}% of a live step)")
        pipe.close()


if __name__ == "__main__":
    main()
