"""Enhance / Upscale on tiny ONNX models of the real signatures: faces restored only where they are, the
picture enlarged by the model's own layers over seamless tiles, the file fitted to the upload limit."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facechain_core import safety
from facechain_core.enhance import EnhancePipeline, Upscaler, encode_to_fit, restore_faces, wants_auto_restore
from facechain_core.errors import UserFacingError
from facechain_core.faces import create_detector
from facechain_core.pipeline import PipelineContext
from facechain_core.restore import FaceRestorer
from facechain_core.sessions import providers_for
from facechain_core.tiny.restore import CONSTANT_RGB, build_restorer
from facechain_core.tiny.upscale import build_upscaler

pytestmark = pytest.mark.timeout(120)
ORT_HAS_CUDA = providers_for("cuda")[0] != "CPUExecutionProvider"


class Steps:
    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def __call__(self, step: int, total: int, text: str | None = None) -> None:
        self.seen.append((step, total))

    def yield_point(self) -> None:
        pass


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("enhance_models")
    return {"real-esrgan-x2-onnx": str(build_upscaler(folder / "x2.onnx", 2)),
            "real-esrgan-x4-onnx": str(build_upscaler(folder / "x4.onnx", 4, seed=1)),
            "gfpgan-1.4-onnx": str(build_restorer(folder / "gfpgan.onnx", constant=True))}


def _pipeline(models: dict[str, str], yunet_path: Path, **settings: object) -> EnhancePipeline:
    pipeline = EnhancePipeline()
    pipeline.load(PipelineContext(models_dir=yunet_path.parent, settings={"model_paths": models, **settings}))
    return pipeline


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8))


@pytest.mark.parametrize("scale", [2, 4])
def test_enhance_enlarges_through_the_onnx_model(tmp_path: Path, models: dict[str, str], yunet_path: Path,
                                                 scale: int) -> None:
    source = tmp_path / "in.png"
    _noise(70, 45).save(source)
    pipeline = _pipeline(models, yunet_path, enhance_tile=32, enhance_tile_pad=4)
    steps = Steps()
    result = pipeline.run({"image": str(source), "scale": scale, "max_bytes": 50_000_000,
                           "out_dir": str(tmp_path / "out")}, steps)
    (out,) = result.files
    with Image.open(out) as image:
        assert image.size == (70 * scale, 45 * scale) and image.format == "PNG"
    assert result.meta["size"] == [70 * scale, 45 * scale] and result.meta["format"] == "png"
    assert pipeline.upscaler(scale).scale == scale  # read from what the model returned
    assert "AI-generated" in safety.read_label(out)["description"]
    assert steps.seen[-1][0] == steps.seen[-1][1] and len(steps.seen) >= 2 + 6  # 3 x 2 tiles reported


def test_tiles_join_without_seams(models: dict[str, str]) -> None:
    rgb = np.asarray(_noise(100, 60, seed=3))
    whole = Upscaler.open(Path(models["real-esrgan-x2-onnx"]), tile=128, pad=8)(rgb)
    tiled = Upscaler.open(Path(models["real-esrgan-x2-onnx"]), tile=24, pad=8)(rgb)
    assert whole.shape == (120, 200, 3)
    assert np.abs(whole.astype(int) - tiled.astype(int)).max() <= 1  # float rounding only


def test_restoration_changes_only_the_face_region(tmp_path: Path, models: dict[str, str], yunet_path: Path,
                                                  faces_dir: Path) -> None:
    with Image.open(faces_dir / "obama.jpg") as photo:
        rgb = np.asarray(photo.convert("RGB"))
    (face, *_) = create_detector("yunet", yunet_path).detect(rgb)
    restorer = FaceRestorer.open(Path(models["gfpgan-1.4-onnx"]))
    out = restore_faces(rgb, [face], restorer)
    x, y, w, h = (int(v) for v in face.box)
    changed = np.any(out != rgb, axis=2)
    assert changed.any()
    # Nothing changes beyond twice the face's box; its middle is the restorer's own colour.
    ys, xs = np.nonzero(changed)
    assert xs.min() >= x - w and xs.max() <= x + 2 * w and ys.min() >= y - h and ys.max() <= y + 2 * h
    cx, cy = (int(v) for v in face.landmarks[2])  # the nose tip
    assert np.abs(out[cy, cx].astype(float) - np.array(CONSTANT_RGB) * 255).max() <= 2.0
    assert changed.sum() < 0.5 * changed.size


def test_the_file_falls_back_to_jpeg_then_refuses(tmp_path: Path, models: dict[str, str],
                                                  yunet_path: Path) -> None:
    image = _noise(96, 96)  # noise: the PNG is far larger than the JPEG
    png, fmt = encode_to_fit(image, 10**9, "Bot")
    assert fmt == "PNG"
    jpeg, fmt = encode_to_fit(image, len(png) - 1, "Bot")
    assert fmt == "JPEG" and len(jpeg) < len(png)
    with Image.open(io.BytesIO(jpeg)) as opened:
        assert opened.format == "JPEG"
    jpeg_path = tmp_path / "fallback.jpg"
    jpeg_path.write_bytes(jpeg)
    assert "AI-generated" in safety.read_label(jpeg_path)["description"]
    assert encode_to_fit(image, len(jpeg) - 1, "Bot") == (b"", "")
    # Through the pipeline: x4 of the noise exceeds a tiny limit, and the refusal says which.
    source = tmp_path / "in.png"
    image.save(source)
    pipeline = _pipeline(models, yunet_path)
    with pytest.raises(UserFacingError) as refused:
        pipeline.run({"image": str(source), "scale": 4, "max_bytes": 20_000, "out_dir": str(tmp_path)}, Steps())
    assert refused.value.code == "enhance.too_big" and refused.value.details["scale"] == 4


def test_an_upscaler_of_the_wrong_scale_is_refused(tmp_path: Path, models: dict[str, str],
                                                   yunet_path: Path) -> None:
    swapped = {**models, "real-esrgan-x4-onnx": models["real-esrgan-x2-onnx"]}
    with pytest.raises(ValueError, match="enlarges x2"):
        _pipeline(swapped, yunet_path).upscaler(4)


@pytest.mark.parametrize(("mode", "device", "expected"), [
    ("off", "cpu", False), ("on", "cpu", True), ("auto", "cpu", False), ("auto", "cuda", ORT_HAS_CUDA)])
def test_auto_restore_runs_on_a_gpu_or_when_on(mode: str, device: str, expected: bool) -> None:
    assert wants_auto_restore(mode, device) is expected


def test_an_unknown_auto_restore_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="auto_restore"):
        wants_auto_restore("always", "cpu")


def test_the_enhance_button_joins_the_last_row_once_per_result() -> None:
    from types import SimpleNamespace

    from handlers import enhance
    from handlers.protocols import Button

    def art(kind: str, number: int, media: str = "image/png") -> SimpleNamespace:
        return SimpleNamespace(id=f"a{number}", kind=kind, media_type=media)

    report = [Button("Report 1", "report:a1"), Button("Report 2", "report:a2")]
    full = [Button(str(i), f"x:{i}") for i in range(3)]
    pictures = [art("portrait", 1), art("portrait", 2)]
    rows = enhance.enhance_keyboard(None, None, [full, report], pictures, "en")
    assert rows[:-1] == [full] and [b.payload for b in rows[-1]] == ["report:a1", "report:a2", "enhance:a1"]
    rows = enhance.enhance_keyboard(None, None, [full], [art("tryon", 7)], "en")
    assert rows == [full, [Button(t_enhance(), "enhance:a7")]]
    others = [art("cartoon", 1), art("talk", 2, "video/mp4")]
    assert enhance.enhance_keyboard(None, None, [full], others, "en") == [full]


def t_enhance() -> str:
    from handlers.messages import t

    return t("enhance.button", "en")
