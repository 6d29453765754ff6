"""Time switching the user LoRA on a resident base against reloading the whole portrait pipeline.

Runs on the full-size SD1.5 architecture with random weights (``--tiny`` for a quick run), on CPU
by default. Prints the switch time (another user's LoRA copied into the resident base's "user"
adapter), the first-adapter load time, the full reload time (base + IP-Adapter FaceID + ArcFace from
disk; warm: files in the page cache, cold: our files dropped from it first) and the ratios. The goal,
judged on the warm reload (the smaller ratio), is at least 50x.

    python bench/bench_lora_switch.py [--tiny] [--models DIR] [--steps 1] [--device cpu]
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from facechain_core.identity import Identity, normalise, save_identity  # noqa: E402
from facechain_core.pipeline import PipelineContext  # noqa: E402
from facechain_core.portrait import LoraRequest, PortraitPipeline  # noqa: E402
from facechain_core.tiny import build_arcface, build_ip_adapter_faceid, build_lora, build_sd15  # noqa: E402

GOAL = 50.0
USERS = 3


def build_models(root: Path, *, tiny: bool, lora_rank: int) -> dict[str, Path]:
    """Build (or reuse what a previous run completed) the models the bench needs under root."""
    marker = root / f".complete-{'tiny' if tiny else 'full'}"
    paths = {
        "sd15": root / "sd15", "ip_adapter": root / "ip-adapter-faceid_sd15.bin", "arcface": root / "w600k_r50.onnx",
        **{f"user{i}": root / "loras" / f"user{i}_r{lora_rank}.safetensors" for i in range(USERS)},
    }
    started = time.perf_counter()
    if not marker.exists():
        build_sd15(paths["sd15"], full_size=not tiny)
        build_ip_adapter_faceid(paths["ip_adapter"], paths["sd15"], full_size=not tiny,
                                lora_rank=4 if tiny else 128)
        build_arcface(paths["arcface"])
        marker.touch()
    for i in range(USERS):
        if not paths[f"user{i}"].exists():
            build_lora(paths["sd15"], paths[f"user{i}"], rank=lora_rank, seed=100 + i)
    print(f"models ready in {time.perf_counter() - started:.1f} s under {root}")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models instead of the full-size SD1.5 layout")
    parser.add_argument("--models", type=Path, help="keep and reuse built models here (default: a temp dir)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--switches", type=int, default=6, help="user switches to time")
    parser.add_argument("--lora-rank", type=int, default=4, help="user LoRA rank (train_lora's default: 4)")
    parser.add_argument("--steps", type=int, default=1, help="denoising steps of one check image (0: none)")
    parser.add_argument("--size", type=int, help="check image side in pixels (default 256, tiny 64)")
    parser.add_argument("--check", action="store_true", help=f"exit 1 when the ratio is below {GOAL:g}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
    for name in ("diffusers", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    size = args.size or (64 if args.tiny else 256)

    with tempfile.TemporaryDirectory(prefix="bench_lora_") as tmp:
        root = args.models or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        paths = build_models(root, tiny=args.tiny, lora_rank=args.lora_rank)
        dtype = "float16" if args.device.startswith("cuda") else "float32"
        context = PipelineContext(models_dir=root, device=args.device, dtype=dtype, settings={
            "sd15_path": str(paths["sd15"]), "ip_adapter_path": str(paths["ip_adapter"]),
            "arcface_path": str(paths["arcface"]), "face_filter": False, "oversample": 1})

        def sync() -> None:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        def load(cold: bool) -> tuple[PortraitPipeline, float]:
            if cold:
                drop_from_page_cache(root)
            pipeline = PortraitPipeline()
            started = time.perf_counter()
            pipeline.load(context)
            sync()
            return pipeline, time.perf_counter() - started

        # The reload a switch saves: drop the resident base and load everything again.
        pipeline, first_load = load(cold=False)  # includes the process's one-off import costs
        reloads = {}
        for cold in (True, False):
            pipeline.close()
            pipeline, reloads[cold] = load(cold)

        base = pipeline.base("sd15")
        loads_before = pipeline._resident.loads.copy() if pipeline._resident else None
        users = [LoraRequest("user", paths[f"user{i}"], 0.8) for i in range(USERS)]
        started = time.perf_counter()
        pipeline.activate_loras(base, [users[0]])
        sync()
        fresh = time.perf_counter() - started
        switches = []
        for n in range(args.switches):
            started = time.perf_counter()
            pipeline.activate_loras(base, [users[1 + n % (USERS - 1)]])
            sync()
            switches.append(time.perf_counter() - started)
        switch = statistics.median(switches)

        if args.steps:
            identity = root / "identity.npz"
            vectors = normalise(np.random.default_rng(0).standard_normal((1, 512))).astype(np.float32)
            save_identity(Identity(vectors[0], vectors, np.zeros((224, 224, 3), np.uint8)), identity)
            style = {"id": "bench", "family": "sd15", "prompt": "{subject}, portrait", "negative_prompt": "",
                     "identity_weight": 1.0, "sampler": {"scheduler": "ddim", "steps": args.steps,
                                                         "guidance_scale": 5.0, "width": size,
                                                         "height": size}}
            started = time.perf_counter()
            result = pipeline.run({"style": style, "identity": str(identity), "count": 1, "seed": 0,
                                   "out_dir": str(root / "out"), "user_lora": str(paths["user1"]),
                                   "user_lora_scale": 0.8}, lambda step, total, text=None: None)
            print(f"check image ({args.steps} step, {size}px, user LoRA active): "
                  f"{time.perf_counter() - started:.2f} s -> {result.files[0].name}")
        base_loads = sum((pipeline._resident.loads - loads_before).values()) if pipeline._resident else 0

    ratio, cold_ratio = reloads[False] / switch, reloads[True] / switch
    arch = "tiny SD1.5" if args.tiny else "full-size SD1.5 (random weights)"
    print(f"architecture: {arch}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"user LoRA rank {args.lora_rank}")
    print(f"first load in this process:      {first_load:8.2f} s")
    print(f"full pipeline reload, cold:      {reloads[True]:8.2f} s")
    print(f"full pipeline reload, warm:      {reloads[False]:8.2f} s")
    print(f"first user LoRA (new adapter):   {fresh * 1000:8.1f} ms")
    print(f"user LoRA switch (median of {len(switches)}):  {switch * 1000:8.1f} ms "
          f"(min {min(switches) * 1000:.1f}, max {max(switches) * 1000:.1f})")
    print(f"base loads during switches and the check image: {base_loads}")
    print(f"ratio cold reload / switch:      {cold_ratio:8.1f}x")
    verdict = "met" if ratio >= GOAL else "NOT met"
    print(f"ratio warm reload / switch:      {ratio:8.1f}x (goal >= {GOAL:g}x: {verdict})")
    return 1 if args.check and ratio < GOAL else 0


def drop_from_page_cache(root: Path) -> None:
    """Ask the kernel to forget the cached pages of our model files (only ours), as after a reboot."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
