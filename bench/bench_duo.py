"""Time a duo (group) portrait job: SD1.5 + openpose ControlNet + IP-Adapter FaceID with one masked image per person.

Random weights of the real formats (built by facechain_core.tiny). By default the tiny duo models at a reduced
size on the CPU; ``--full-size`` builds the real SD1.5 dimensions (for a GPU). Prints the load time, the job time
(median of --runs after one warm-up) and its share per denoising step, and the peak GPU memory on CUDA.

    python bench/bench_duo.py                                   # tiny, 2 people, 128 px area, 4 steps, CPU
    python bench/bench_duo.py --full-size --device cuda --side 512 --steps 30 --people 2
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from facechain_core.duo import DuoPipeline  # noqa: E402
from facechain_core.pipeline import PipelineContext  # noqa: E402
from facechain_core.tiny import build_arcface, build_identity, build_ip_adapter_faceid, build_sd15  # noqa: E402
from facechain_core.tiny.duo import build_duo_models  # noqa: E402
from facechain_core.tiny.tryon import build_controlnet  # noqa: E402


def build_models(root: Path, full_size: bool) -> dict[str, Path]:
    """The base, its openpose ControlNet, its FaceID adapter and ArcFace under root."""
    if full_size:
        at = {"sd15": root / "sd15", "controlnet-openpose-sd15": root / "controlnet",
              "ip-adapter-faceid-sd15": root / "ip-adapter-faceid_sd15.bin"}
        build_sd15(at["sd15"], full_size=True)
        build_controlnet(at["controlnet-openpose-sd15"], at["sd15"])
        build_ip_adapter_faceid(at["ip-adapter-faceid-sd15"], at["sd15"], full_size=True, lora_rank=128)
    else:
        at = build_duo_models(root)
    at["arcface"] = build_arcface(root / "w600k_r50.onnx")
    return at


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-size", action="store_true", help="the real SD1.5 dimensions instead of tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--side", type=int, default=128, help="the picture's area is side x side (layout's aspect)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--people", type=int, default=2, choices=(2, 3, 4))
    parser.add_argument("--runs", type=int, default=3, help="timed jobs after one warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        models = build_models(root / "models", args.full_size)
        print(f"built the models in {time.perf_counter() - started:.1f} s")
        people = [str(build_identity(root / f"p{i}.npz", i)) for i in range(args.people)]
        settings = {"sd15_path": str(models["sd15"]), "ip_adapter_path": str(models["ip-adapter-faceid-sd15"]),
                    "arcface_path": str(models["arcface"]), "face_filter": False, "oversample": 1,
                    "duo_min_similarity": -1.0, "safe_mode": False,
                    "model_paths": {"controlnet-openpose-sd15": str(models["controlnet-openpose-sd15"])}}
        dtype = "float16" if args.device.startswith("cuda") else "float32"
        pipeline = DuoPipeline()
        started = time.perf_counter()
        pipeline.load(PipelineContext(models_dir=root, device=args.device, dtype=dtype, settings=settings))
        style = {"id": "bench", "family": "sd15", "prompt": "{subject}, studio portrait", "identity_weight": 1.0,
                 "sampler": {"scheduler": "ddim", "steps": args.steps, "guidance_scale": 5.0, "width": args.side,
                             "height": args.side}}
        job = {"style": style, "identities": people, "count": 1, "seed": 1, "out_dir": str(root / "out")}
        pipeline.run(job, lambda done, total: None)  # warm-up: the ControlNet pipeline loads on first use
        print(f"load + warm-up {time.perf_counter() - started:.2f} s")
        times = []
        for _ in range(args.runs):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            result = pipeline.run(job, lambda done, total: None)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        width, height = result.meta["size"]
        print(f"duo job, {args.people} people, {width}x{height}, {args.steps} steps, "
              f"{'full size' if args.full_size else 'tiny'} on {args.device}: median {median:.3f} s over "
              f"{args.runs} runs ({median / args.steps * 1000:.1f} ms per step)")
        if args.device.startswith("cuda"):
            print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
