"""Studio jobs on tiny models (CPU): what pose and templates add to a portrait job's own work.

Each job runs warm in this process through the real pipelines (``PortraitPipeline``, ``TemplatePipeline``) on
tiny random-weight models of the real formats at 64 px and 4 steps, so the figures are the studio's service
overhead (pose map, DWPose, derived ControlNet pipeline, face detection, mask, composite, ranking), not
generation speed. Full-size timings need a GPU (bench_generate.py, bench_tryon.py).

Run: ``.venv/bin/python bench/bench_studio.py [--runs N]``.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from facechain_core.identity import Identity, normalise, save_identity
from facechain_core.manifest import load_manifest
from facechain_core.pipeline import PipelineContext
from facechain_core.portrait import PortraitPipeline
from facechain_core.styles import load_styles
from facechain_core.template import TemplatePipeline
from facechain_core.tiny import build_all
from facechain_core.tiny.tryon import build_tryon_models, draw_outfit

YUNET = Path(__file__).resolve().parent.parent.parent / "shared" / "models" / "yunet_s_640_640.onnx"


def _progress(step: int, total: int, text: str | None = None) -> None:
    pass


def _median(run: Any, runs: int) -> float:
    run()  # warm: models loaded, derived pipelines built
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if not YUNET.is_file():
        raise SystemExit(f"needs the YuNet detector at {YUNET}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_all(root / "models")
        tryon = build_tryon_models(root / "models")
        paths = {e.name: root / "models" / e.path for e in load_manifest().entries
                 if (root / "models" / e.path).exists()}
        settings = {"face_filter": False, "oversample": 1, "sampler_override": {"steps": 4, "width": 64, "height": 64},
                    "template": {"side": 64, "steps": 4}, "model_paths": {**paths, **tryon, "yunet": YUNET}}
        context = PipelineContext(models_dir=root / "models", settings=settings)
        rng = np.random.default_rng(0)
        vectors = rng.normal(size=(2, 512)).astype(np.float32)
        identity = save_identity(Identity(normalise(vectors.mean(0)), vectors, np.zeros((224, 224, 3), np.uint8)),
                                 root / "identity.npz")
        portrait = PortraitPipeline()
        portrait.load(context)
        photo = root / "pose.png"
        Image.fromarray(draw_outfit(256, arm_angle=0.5)).save(photo)
        style = load_styles()["hanfu"].model_dump(mode="json")

        def style_job(controls: dict[str, Any]) -> Any:
            return lambda: portrait.run({"style": style, "identity": str(identity), "count": 1, "seed": 1,
                                         "out_dir": str(root / "out"), "controls": controls}, _progress)

        template = TemplatePipeline()
        template.load(context)
        picture = root / "template.png"
        from skimage import data  # a dev dependency: the public-domain astronaut photo

        Image.fromarray(data.astronaut()).save(picture)
        rows = [
            ("portrait, no controls", style_job({})),
            ("portrait, aspect 2:3 + likeness high", style_job({"aspect": "2:3", "likeness": "high"})),
            ("portrait, library pose (openpose ControlNet)", style_job({"pose": {"id": "seated"}})),
            ("portrait, pose from a photo (DWPose + ControlNet)", style_job({"pose": {"image": str(photo)}})),
            ("portrait, Vary", style_job({"vary": {"seed": 1}})),
            ("template (detect, mask, DWPose, inpaint, composite)", lambda: template.run(
                {"template": str(picture), "identity": str(identity), "count": 1, "seed": 1,
                 "out_dir": str(root / "tpl")}, _progress)),
            ("template, Vary", lambda: template.run(
                {"template": str(picture), "identity": str(identity), "count": 1, "seed": 1,
                 "controls": {"vary": {"seed": 1}}, "out_dir": str(root / "tpl")}, _progress)),
        ]
        base = None
        print(f"studio jobs on tiny models, 64 px, 4 steps, 1 torch thread, median of {args.runs} warm runs")
        for name, run in rows:
            seconds = _median(run, args.runs)
            base = seconds if base is None else base
            print(f"  {name:<52} {seconds * 1000:8.1f} ms   (+{(seconds - base) * 1000:7.1f} ms over plain)")


if __name__ == "__main__":
    main()
