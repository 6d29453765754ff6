"""Time portrait generation through ``PortraitPipeline.run`` on the full-size SD1.5 architecture (random weights).

Builds (or reuses, ``--models``) SD1.5, IP-Adapter FaceID (rank-128 LoRA, as published) and ArcFace with
bench_lora_switch's builder, loads them on ``--device`` (float16 on cuda), then for each batch size times
jobs of ``count = batch`` pictures (one diffusers call each, a user LoRA active): seconds per picture,
denoising steps per second (from the step callbacks, the device synchronised at each) and peak GPU memory.
The first job of each row is a warm-up, reported apart. ``--sdxl`` adds the full-size SDXL layout at
1024 px (its build writes about 14 GB of float32 weights: minutes of CPU). ``--tiny``: tiny models at
64 px, a quick check of this script on the CPU.

    python bench/bench_generate.py --device cuda [--models /tmp/models] [--runs 3] [--sdxl]
    python bench/bench_generate.py --tiny
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_lora_switch import build_models  # noqa: E402
from facechain_core.identity import Identity, normalise, save_identity  # noqa: E402
from facechain_core.pipeline import PipelineContext  # noqa: E402
from facechain_core.portrait import PortraitPipeline  # noqa: E402
from facechain_core.tiny import build_ip_adapter_faceid, build_lora, build_sdxl  # noqa: E402


@dataclass
class Row:
    """One configuration's figures."""

    family: str
    size: int
    steps: int
    batch: int
    lora: bool
    warmup_s: float
    job_s: list[float]
    its: list[float]  # denoising steps per second, one per timed job
    peak_gb: float | None

    def line(self) -> str:
        job = statistics.median(self.job_s)
        peak = f"{self.peak_gb:7.2f}" if self.peak_gb is not None else "      -"
        return (f"{self.family:6} {self.size:5d} {self.steps:5d} {self.batch:5d} {'yes' if self.lora else 'no':>4} "
                f"{self.warmup_s:8.2f} {job:8.2f} {job / self.batch:8.3f} {statistics.median(self.its):7.2f} "
                f"{self.batch * statistics.median(self.its):8.2f} {peak}")


HEADER = ("family  size steps batch lora warmup_s    job_s  s/image    it/s  img-it/s peak_GB\n"
          "(job_s: median wall time of one run() incl. prompt encode, VAE decode, ArcFace ranking, PNG writing;"
          " it/s: denoising steps of the whole batch per second; img-it/s = batch * it/s)")


class _StepClock:
    """A progress callback that records when each step ended, the device synchronised first."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.times: list[float] = []

    def __call__(self, step: int, total: int, text: str | None = None) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def yield_point(self) -> None:
        pass


def build_sdxl_models(root: Path, *, tiny: bool) -> dict[str, Path]:
    """Build (or reuse) the SDXL layout, its IP-Adapter FaceID and a user LoRA under root."""
    marker = root / f".complete-sdxl-{'tiny' if tiny else 'full'}"
    paths = {"sdxl": root / "sdxl", "ip_adapter": root / "ip-adapter-faceid_sdxl.bin",
             "user": root / "loras" / "sdxl_user_r4.safetensors"}
    started = time.perf_counter()
    if not marker.exists():
        build_sdxl(paths["sdxl"], full_size=not tiny)
        # The published SDXL FaceID file carries no LoRA (it ships apart): none here either.
        build_ip_adapter_faceid(paths["ip_adapter"], paths["sdxl"], full_size=not tiny, lora_rank=0)
        build_lora(paths["sdxl"], paths["user"], rank=4, seed=200)
        marker.touch()
    print(f"SDXL models ready in {time.perf_counter() - started:.1f} s under {root}")
    return paths


def measure(pipeline: PortraitPipeline, family: str, identity: Path, out: Path, user_lora: Path | None, *,
            size: int, steps: int, batch: int, runs: int, device: str) -> Row:
    """Run one warm-up job and `runs` timed jobs of `batch` pictures; return their figures."""
    style = {"id": "bench", "family": family, "prompt": "{subject}, studio portrait, detailed face",
             "negative_prompt": "blurry, lowres", "identity_weight": 1.0,
             "sampler": {"scheduler": "dpmpp_2m", "steps": steps, "guidance_scale": 5.0,
                         "width": size, "height": size}}
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    job_s: list[float] = []
    its: list[float] = []
    warmup = 0.0
    for run in range(runs + 1):
        clock = _StepClock(device)
        params = {"style": style, "identity": str(identity), "count": batch, "seed": 1000 * run,
                  "out_dir": str(out / f"{family}_{size}_{batch}_{run}"),
                  "user_lora": str(user_lora) if user_lora else None, "user_lora_scale": 0.8}
        started = time.perf_counter()
        result = pipeline.run(params, clock)
        elapsed = time.perf_counter() - started
        if len(result.files) != batch:
            raise RuntimeError(f"asked for {batch} pictures, got {len(result.files)}")
        step_ends = clock.times[:steps]  # then one call after ranking
        if run == 0:
            warmup = elapsed
            print(f"  warm-up {family} {size}px batch {batch} lora={user_lora is not None}: {elapsed:.2f} s")
            continue
        job_s.append(elapsed)
        its.append((len(step_ends) - 1) / (step_ends[-1] - step_ends[0]))
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    row = Row(family, size, steps, batch, user_lora is not None, warmup, job_s, its, peak)
    print(f"  timed: {row.line()}  runs {', '.join(f'{s:.2f}' for s in job_s)}")
    return row


FUSE_CHOICES = {"auto": "auto", "on": True, "off": False}


def bench_family(family: str, settings: dict[str, Any], root: Path, identity: Path, user_lora: Path, *,
                 args: argparse.Namespace, size: int, steps: int, batches: list[int]) -> list[Row]:
    """Load the family's base on the device and measure each batch size (and batch 1 without the LoRA)."""
    dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    context = PipelineContext(models_dir=root, device=args.device, dtype=dtype, settings={
        **settings, "default_family": family, "face_filter": False, "oversample": 1, "safe_mode": False,
        "batch_size": max(batches), "fuse_loras": FUSE_CHOICES[args.fuse_loras]})
    pipeline = PortraitPipeline()
    started = time.perf_counter()
    pipeline.load(context)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated() / 2**30
        print(f"{family}: loaded on {args.device} ({dtype}) in {time.perf_counter() - started:.1f} s, "
              f"{resident:.2f} GB resident")
    else:
        print(f"{family}: loaded on {args.device} ({dtype}) in {time.perf_counter() - started:.1f} s")
    rows = []
    try:
        for batch in batches:
            rows.append(measure(pipeline, family, identity, root / "out", user_lora, size=size, steps=steps,
                                batch=batch, runs=args.runs, device=args.device))
        rows.append(measure(pipeline, family, identity, root / "out", None, size=size, steps=steps,
                            batch=batches[0], runs=args.runs, device=args.device))
    finally:
        pipeline.close()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models at 64 px (a CPU check of this script)")
    parser.add_argument("--models", type=Path, help="keep and reuse built models here (default: a temp dir)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", help="weights dtype (default: float16 on cuda, float32 elsewhere)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 25, tiny 4)")
    parser.add_argument("--size", type=int, help="SD1.5 picture side (default 512, tiny 64)")
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes (default 1,4)")
    parser.add_argument("--runs", type=int, default=3, help="timed jobs per row after the warm-up")
    parser.add_argument("--fuse-loras", choices=sorted(FUSE_CHOICES), default="auto",
                        help="merge the active LoRAs for each batch (auto: on cuda; see facechain_core.lora_fuse)")
    parser.add_argument("--sdxl", action="store_true", help="also the SDXL layout at 1024 px (tiny: 64)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
    for name in ("diffusers", "transformers", "peft", "facechain_core.safety"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers
    import diffusers.utils.logging
    import transformers
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    steps = args.steps or (4 if args.tiny else 25)
    size = args.size or (64 if args.tiny else 512)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "-"
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}; "
          f"device {args.device} ({gpu}), torch threads {torch.get_num_threads()}")

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        root = args.models or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        paths = build_models(root, tiny=args.tiny, lora_rank=4)
        identity = root / "identity.npz"
        vectors = normalise(np.random.default_rng(0).standard_normal((1, 512))).astype(np.float32)
        save_identity(Identity(vectors[0], vectors, np.zeros((224, 224, 3), np.uint8)), identity)
        settings = {"sd15_path": str(paths["sd15"]), "ip_adapter_path": str(paths["ip_adapter"]),
                    "arcface_path": str(paths["arcface"])}
        rows += bench_family("sd15", settings, root, identity, paths["user0"], args=args, size=size, steps=steps,
                             batches=batches)
        if args.sdxl:
            sdxl = build_sdxl_models(root, tiny=args.tiny)
            rows += bench_family("sdxl", {**settings, "sdxl_path": str(sdxl["sdxl"]),
                                          "sdxl_ip_adapter_path": str(sdxl["ip_adapter"])},
                                 root, identity, sdxl["user"], args=args, size=64 if args.tiny else 1024,
                                 steps=steps, batches=batches)

    arch = "tiny" if args.tiny else "full-size (random weights)"
    print(f"\nportrait generation, {arch}, {args.device} ({gpu}), IP-Adapter FaceID, safe mode off, "
          f"fuse_loras {args.fuse_loras}, {args.runs} timed runs per row after one warm-up")
    print(HEADER)
    for row in rows:
        print(row.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
