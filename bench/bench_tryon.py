"""Time a try-on job: SD1.5 inpainting + openpose and depth ControlNets + IP-Adapter FaceID.

Full-size architectures with random weights (built by facechain_core.tiny; the clothes parser and the
pose model stay tiny: they run once per job and cost little beside the denoising). Prints the load
time, the job time at --side with --steps, its share per denoising step, and the peak GPU memory; with
--users N, the pictures per second of N users' try-ons run one by one against one shared pass
(``TryOnPipeline.run_batch``, as the scheduler batches them).

    python bench/bench_tryon.py --device cuda            # 512 px, 30 steps, full size, float16
    python bench/bench_tryon.py --tiny --steps 2         # quick CPU check of the bench itself
    python bench/bench_tryon.py --tiny --users 4         # cross-user batching: one by one vs one pass
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from facechain_core.identity import Identity, normalise, save_identity  # noqa: E402
from facechain_core.pipeline import PipelineContext  # noqa: E402
from facechain_core.tiny import build_arcface, build_ip_adapter_faceid  # noqa: E402
from facechain_core.tiny.tryon import build_tryon_models, draw_outfit  # noqa: E402
from facechain_core.tryon import TryOnPipeline  # noqa: E402


def build_models(root: Path, *, tiny: bool) -> dict[str, Path]:
    """Build (or reuse a completed earlier build under root) every model the try-on loads."""
    marker = root / f".complete-tryon-{'tiny' if tiny else 'full'}"
    at = {"ip-adapter-faceid-sd15": root / "ip-adapter-faceid_sd15.bin", "arcface": root / "w600k_r50.onnx"}
    if not marker.exists():
        started = time.perf_counter()
        at.update(build_tryon_models(root, full_size=not tiny))
        build_ip_adapter_faceid(at["ip-adapter-faceid-sd15"], at["sd15-inpainting"], full_size=not tiny,
                                lora_rank=4 if tiny else 128)
        build_arcface(at["arcface"])
        marker.write_text("ok")
        print(f"built the models in {time.perf_counter() - started:.1f} s")
    else:
        from facechain_core.tiny.tryon import TRYON_LAYOUT

        at.update({name: root / rel for name, rel in TRYON_LAYOUT.items()})
    return at


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models instead of the full-size layouts")
    parser.add_argument("--models", type=Path, help="keep and reuse built models here (default: a temp dir)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--side", type=int, help="working size's longer side (default 512, tiny 64)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3, help="timed jobs after one warm-up")
    parser.add_argument("--users", type=int, default=1, help="also time N users' try-ons one by one vs one pass")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in ("diffusers", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    side = args.side or (64 if args.tiny else 512)
    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(1)  # steadier figures on a shared, loaded CPU

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory(prefix="bench_tryon_") as tmp:
        root = args.models or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        at = build_models(root, tiny=args.tiny)
        vectors = normalise(np.random.default_rng(0).standard_normal((1, 512))).astype(np.float32)
        save_identity(Identity(vectors[0], vectors, np.zeros((224, 224, 3), np.uint8)), root / "identity.npz")
        Image.fromarray(draw_outfit(side, arm_angle=0.4, seed=1)).save(root / "outfit.png")
        context = PipelineContext(models_dir=root, device=args.device, dtype="float16" if cuda else "float32",
                                  settings={"face_filter": False, "oversample": 1, "model_paths": at,
                                            "tryon": {"side": side, "steps": args.steps}})
        pipeline = TryOnPipeline()
        started = time.perf_counter()
        pipeline.load(context)
        sync()
        load_s = time.perf_counter() - started
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def job(seed: int) -> float:
            started = time.perf_counter()
            pipeline.run({"outfit": str(root / "outfit.png"), "identity": str(root / "identity.npz"), "seed": seed,
                          "out_dir": str(root / "out" / str(seed))}, lambda step, total, text=None: None)
            sync()
            return time.perf_counter() - started

        warm = job(0)
        times = [job(1 + n) for n in range(args.runs)]
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        shared = users_per_second(pipeline, root, args.users, args.runs, sync) if args.users > 1 else None
        pipeline.close()

    median = statistics.median(times)
    arch = "tiny" if args.tiny else "full-size SD1.5 inpainting + 2 ControlNets (random weights)"
    print(f"architecture: {arch}, device {args.device}, {side} px, {args.steps} steps, 1 picture per job")
    print(f"load (parser, pose, ArcFace, base + ControlNets + IP-Adapter): {load_s:8.2f} s")
    print(f"first job (warm-up):                 {warm:8.2f} s")
    print(f"job, median of {len(times)}:                 {median:8.2f} s "
          f"(min {min(times):.2f}, max {max(times):.2f})")
    print(f"per denoising step (job / steps):    {median / args.steps * 1000:8.1f} ms")
    if cuda:
        print(f"peak GPU memory allocated:           {peak:8.2f} GiB")
    if shared is not None:
        alone, together = shared
        print(f"{args.users} users, pictures/s one by one: {alone:8.2f}")
        print(f"{args.users} users, pictures/s one pass:   {together:8.2f} ({together / alone:.2f}x)")
    return 0


def users_per_second(pipeline: TryOnPipeline, root: Path, users: int, runs: int, sync: Any) -> tuple[float, float]:
    """Pictures per second (medians of `runs`) of `users` try-ons, each user with their own identity and seed,
    run one by one and then as one shared pass."""
    jobs = []
    for n in range(users):
        vectors = normalise(np.random.default_rng(10 + n).standard_normal((1, 512))).astype(np.float32)
        identity = save_identity(Identity(vectors[0], vectors, np.zeros((224, 224, 3), np.uint8)),
                                 root / f"user{n}.npz")
        jobs.append({"outfit": str(root / "outfit.png"), "identity": str(identity), "seed": 50 + n,
                     "out_dir": str(root / "users" / str(n))})

    def quiet(step: int, total: int, text: str | None = None) -> None:
        pass

    def timed(work: Any) -> float:
        started = time.perf_counter()
        work()
        sync()
        return time.perf_counter() - started

    def one_by_one() -> None:
        for job in jobs:
            pipeline.run(job, quiet)

    def one_pass() -> None:
        outcomes = pipeline.run_batch([(job, quiet) for job in jobs])
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            raise failed[0]

    one_pass()  # warm-up at the batch's shapes
    rounds = [(timed(one_by_one), timed(one_pass)) for _ in range(runs)]  # interleaved: load drifts hit both
    return users / statistics.median(a for a, _ in rounds), users / statistics.median(t for _, t in rounds)


if __name__ == "__main__":
    raise SystemExit(main())
