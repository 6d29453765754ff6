"""Time a portrait at a style's steps against fast mode (an accelerator LoRA and its few-step sampler).

Builds (or reuses, ``--models``) the full-size SD1.5 architecture with random weights, IP-Adapter FaceID and
ArcFace (bench_lora_switch's builder) and an accelerator LoRA of the real file format at rank 64 (LCM-LoRA
SD1.5's rank; random weights: this measures time, not looks), then runs ``PortraitPipeline.run`` for one
picture with a user LoRA: once at the style's sampler (``--steps``, DPM-Solver++ 2M, guidance 5) and once in
fast mode, whose scheduler, steps and guidance come from ``facechain_core/accelerators.toml``. Each is run
once to warm up, then ``--runs`` times; the medians and their ratio are printed. On a CPU the picture is
smaller (``--size``, default 64) so `make bench` finishes in minutes; on cuda it is 512 px. ``--tiny``: tiny models
at 64 px, a quick check of this script.

    python bench/bench_fast.py [--device cuda] [--accelerator lcm|tcd|hyper] [--runs 3] [--models DIR]
    python bench/bench_fast.py --tiny
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_lora_switch import build_models  # noqa: E402
from facechain_core.accelerators import accelerators  # noqa: E402
from facechain_core.identity import Identity, normalise, save_identity  # noqa: E402
from facechain_core.pipeline import PipelineContext  # noqa: E402
from facechain_core.portrait import PortraitPipeline  # noqa: E402
from facechain_core.tiny import build_lora  # noqa: E402

ACCELERATOR_RANK = 64  # latent-consistency/lcm-lora-sdv1-5 is a rank-64 LoRA


def _quiet() -> None:
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers", "peft", "facechain_core"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_jobs(pipeline: PortraitPipeline, params: dict[str, Any], runs: int, device: str) -> tuple[float, int]:
    """Median seconds of `runs` jobs after one warm-up, and the denoising steps each reported."""
    seconds, steps = [], 0
    for run in range(runs + 1):
        reported: list[int] = []
        _sync(device)
        started = time.perf_counter()
        result = pipeline.run({**params, "seed": 100 + run, "out_dir": f"{params['out_dir']}/{run}"},
                              lambda step, total, text=None: reported.append(step))
        _sync(device)
        if run:
            seconds.append(time.perf_counter() - started)
        steps = int(result.meta["steps"])
        if len(reported) != steps + 1:
            raise RuntimeError(f"expected {steps} step reports and the ranking's, got {len(reported)}")
    return statistics.median(seconds), steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models at 64 px (a quick check of this script)")
    parser.add_argument("--models", type=Path, help="keep and reuse built models here (default: a temp dir)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--accelerator", default=None, help="an accelerators.toml id (default: its default)")
    parser.add_argument("--steps", type=int, default=25, help="the style's denoising steps (default 25)")
    parser.add_argument("--size", type=int, help="picture side (default: 512 on cuda, 64 on cpu and tiny)")
    parser.add_argument("--runs", type=int, default=1, help="timed jobs per mode after one warm-up (default 1)")
    args = parser.parse_args(argv)
    _quiet()
    cuda = args.device.startswith("cuda")
    size = args.size or (512 if cuda else 64)
    accelerator = accelerators().get(args.accelerator)
    with tempfile.TemporaryDirectory(prefix="bench_fast_") as tmp:
        root = args.models or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        paths = build_models(root, tiny=args.tiny, lora_rank=4)
        fast_lora = root / "loras" / f"accelerator_r{ACCELERATOR_RANK}.safetensors"
        if not fast_lora.exists():
            build_lora(paths["sd15"], fast_lora, rank=4 if args.tiny else ACCELERATOR_RANK, seed=300)
        identity = root / "identity.npz"
        vectors = normalise(np.random.default_rng(0).standard_normal((1, 512))).astype(np.float32)
        save_identity(Identity(vectors[0], vectors, np.zeros((224, 224, 3), np.uint8)), identity)
        pipeline = PortraitPipeline()
        pipeline.load(PipelineContext(models_dir=root, device=args.device, dtype="float16" if cuda else "float32",
                                      settings={
            "sd15_path": str(paths["sd15"]), "ip_adapter_path": str(paths["ip_adapter"]),
            "arcface_path": str(paths["arcface"]), "face_filter": False, "oversample": 1, "safe_mode": False,
            "fast_accelerator": accelerator.id, "model_paths": {accelerator.models["sd15"]: str(fast_lora)}}))
        style = {"id": "bench", "family": "sd15", "prompt": "{subject}, studio portrait, detailed face",
                 "negative_prompt": "blurry, lowres", "identity_weight": 1.0,
                 "sampler": {"scheduler": "dpmpp_2m", "steps": args.steps, "guidance_scale": 5.0, "width": size,
                             "height": size}}
        params = {"style": style, "identity": str(identity), "count": 1, "user_lora": str(paths["user0"]),
                  "user_lora_scale": 0.8, "out_dir": str(root / "out")}
        style_s, style_steps = time_jobs(pipeline, {**params, "out_dir": str(root / "out" / "style")}, args.runs,
                                         args.device)
        fast_s, fast_steps = time_jobs(pipeline, {**params, "fast": True, "out_dir": str(root / "out" / "fast")},
                                       args.runs, args.device)
        pipeline.close()
    arch = "tiny" if args.tiny else "full-size SD1.5 (random weights)"
    device = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} torch threads"
    print(f"portrait, {arch}, {size} px, {args.device} ({device}), FaceID + a user LoRA, median of {args.runs}")
    print(f"  style  {style_steps:3d} steps dpmpp_2m, guidance 5.0: {style_s:8.2f} s")
    print(f"  fast   {fast_steps:3d} steps {accelerator.scheduler}, guidance {accelerator.guidance_scale:g} "
          f"({accelerator.id}): {fast_s:8.2f} s")
    print(f"  ratio  {style_s / fast_s:.2f}x fewer seconds per portrait in fast mode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
