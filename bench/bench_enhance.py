"""Time Enhance: face restoration, then x2 and x4 super-resolution over tiles, through ``EnhancePipeline.run``.

With ``--models DIR`` holding the real ONNX files (`facechain-bot models pull enhance enhance-restore`) the
figures are the real ones (on ``--device cuda`` with onnxruntime-gpu). Without, it builds the tiny models of
the same signatures: absolute times then mean little, so it prints ratios (x4 against x2, restoration
against the whole job, per tile) that show where the time goes.

    python bench/bench_enhance.py                         # tiny models, CPU
    python bench/bench_enhance.py --models models/ --device cuda --side 1024
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from facechain_core.enhance import EnhancePipeline, restore_faces  # noqa: E402
from facechain_core.pipeline import PipelineContext, QuietProgress  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, help="models_dir with the real ONNX files (default: tiny ones)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--side", type=int, default=512, help="the input picture's side (a portrait is 512-1024)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--yunet", type=Path, default=ROOT.parent / "shared" / "models" / "yunet_s_640_640.onnx")
    parser.add_argument("--face", type=Path, default=ROOT.parent / "shared" / "faces" / "obama.jpg",
                        help="a photo with a face (restoration has something to do)")
    return parser.parse_args()


def timed(call: object, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        settings: dict = {"enhance_tile": 256, "enhance_tile_pad": 16}
        models_dir = args.models or args.yunet.parent
        if args.models is None:
            from facechain_core.tiny.restore import build_restorer
            from facechain_core.tiny.upscale import build_upscaler

            settings["model_paths"] = {"real-esrgan-x2-onnx": str(build_upscaler(scratch / "x2.onnx", 2)),
                                       "real-esrgan-x4-onnx": str(build_upscaler(scratch / "x4.onnx", 4)),
                                       "gfpgan-1.4-onnx": str(build_restorer(scratch / "gfpgan.onnx")),
                                       "yunet": str(args.yunet)}
        with Image.open(args.face) as photo:
            picture = photo.convert("RGB").resize((args.side, args.side))
        source = scratch / "in.png"
        picture.save(source)
        pipeline = EnhancePipeline()
        pipeline.load(PipelineContext(models_dir=models_dir, device=args.device, settings=settings))
        loaded = pipeline._loaded
        assert loaded is not None
        rgb = np.asarray(picture)
        faces = loaded.detector.detect(rgb)
        times = {}
        for scale in (2, 4):
            params = {"image": str(source), "scale": scale, "max_bytes": 50_000_000, "out_dir": str(scratch)}
            pipeline.run(params, QuietProgress())  # warm-up: sessions, allocations
            times[scale] = timed(lambda p=params: pipeline.run(p, QuietProgress()), args.runs)
        restore = timed(lambda: restore_faces(rgb, faces, loaded.restorer), args.runs) if loaded.restorer else 0.0
        tiles = pipeline.upscaler(2).tiles(args.side, args.side)
        kind = "real models" if args.models else "tiny models (absolute times mean little: read the ratios)"
        print(f"Enhance of a {args.side} px picture with {len(faces)} face(s) on {args.device}, {kind}")
        for scale in (2, 4):
            print(f"x{scale}: {times[scale]:.3f} s per picture (restore, upscale over {tiles} tiles, PNG/JPEG write)")
        print(f"ratios: x4 / x2 = {times[4] / times[2]:.2f}; face restoration = {restore / times[2]:.0%} of an x2 "
              f"job ({restore:.3f} s); {times[2] / tiles * 1000:.1f} ms per tile at x2")
        pipeline.close()


if __name__ == "__main__":
    main()
