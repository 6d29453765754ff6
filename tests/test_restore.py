"""Face restoration of talking heads on tiny ONNX restorers of the GFPGAN signature: aligned by the
five landmarks, blended in only through the lower-face mask, chosen by talk_restore."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facechain_core.faces import Face
from facechain_core.pipeline import PipelineContext
from facechain_core.restore import FFHQ_TEMPLATE_512, FaceRestorer, alignment, restore_frames
from facechain_core.sessions import providers_for
from facechain_core.talk import FaceGeometry, LipSync, TalkPipeline, animate, lower_face_mask
from facechain_core.tiny.restore import CONSTANT_RGB, build_restorer
from facechain_core.tiny.talk import build_lipsync
from facechain_core.tts import Speech
from tests.test_talk import portrait, speech  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(120)
ORT_HAS_CUDA = providers_for("cuda")[0] != "CPUExecutionProvider"


def test_alignment_puts_the_landmarks_on_the_template() -> None:
    template = FFHQ_TEMPLATE_512 * 0.25
    # A face half the template's scale, turned 10 degrees and moved: the transform undoes all three.
    angle = np.radians(10)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = (FFHQ_TEMPLATE_512 * 0.5) @ rotation.T + np.array([40.0, 25.0])
    matrix = alignment(landmarks, 128)
    mapped = landmarks @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(mapped, template, atol=0.05)


def test_restored_pixels_land_only_inside_the_mouth_mask(tmp_path: Path, portrait: tuple[np.ndarray, Face]) -> None:
    image, face = portrait
    restorer = FaceRestorer.open(build_restorer(tmp_path / "constant.onnx", constant=True))
    assert restorer.side == 512
    mask = lower_face_mask(image.shape, FaceGeometry.of(face, image.shape))
    (frame,) = restore_frames([image], np.array(face.landmarks[:5], np.float32), restorer, mask, 0.5)
    assert np.array_equal(frame[mask == 0], image[mask == 0])  # the eyes, the background: the portrait's own
    colour = np.array(CONSTANT_RGB) * 255
    mx, my = (int(v) for v in FaceGeometry.of(face, image.shape).mouth)
    assert mask[my, mx] == pytest.approx(1.0)
    expected = image[my, mx].astype(float) * 0.5 + colour * 0.5  # half the restorer's green at the mouth
    assert np.abs(frame[my, mx].astype(float) - expected).max() <= 2.0
    assert np.array_equal(restore_frames([image], np.array(face.landmarks[:5]), restorer, mask, 0.0)[0], image)


def test_animate_restores_the_lipsynced_frames(tmp_path: Path, portrait: tuple[np.ndarray, Face],
                                               speech: Speech) -> None:
    image, face = portrait
    model = LipSync.open(build_lipsync(tmp_path / "wav2lip.onnx"))
    plain = animate(image, face, speech, model, motion=False)
    restorer = FaceRestorer.open(build_restorer(tmp_path / "gfpgan.onnx"))
    restored = animate(image, face, speech, model, motion=False, restorer=restorer, restore_weight=1.0)
    mask = lower_face_mask(image.shape, FaceGeometry.of(face, image.shape))
    assert len(restored) == len(plain)
    for a, b in zip(plain, restored):
        assert np.array_equal(a[mask == 0], b[mask == 0])
        assert np.abs(a.astype(int) - b.astype(int))[mask > 0.999].mean() > 1.0


@pytest.mark.parametrize(("mode", "device", "expected"), [
    ("auto", "cpu", False), ("on", "cpu", True), ("off", "cpu", False),
    ("auto", "cuda", ORT_HAS_CUDA)])  # without onnxruntime's CUDA provider the restorer would run on the CPU
def test_talk_restore_setting_picks_the_restorer(tmp_path: Path, yunet_path: Path, mode: str, device: str,
                                                 expected: bool) -> None:
    paths = {"wav2lip-gan-onnx": str(build_lipsync(tmp_path / "w.onnx")),
             "gfpgan-1.4-onnx": str(build_restorer(tmp_path / "g.onnx"))}
    pipeline = TalkPipeline()
    pipeline.load(PipelineContext(models_dir=yunet_path.parent, device=device,
                                  settings={"model_paths": paths, "talk_restore": mode}))
    assert (pipeline._loaded.restorer is not None) is expected


def test_an_unknown_talk_restore_mode_fails_at_load(tmp_path: Path, yunet_path: Path) -> None:
    pipeline = TalkPipeline()
    with pytest.raises(ValueError, match="talk_restore"):
        pipeline.load(PipelineContext(models_dir=yunet_path.parent, settings={
            "model_paths": {"wav2lip-gan-onnx": str(build_lipsync(tmp_path / "w.onnx"))}, "talk_restore": "maybe"}))


def test_the_pipeline_says_it_restored(tmp_path: Path, faces_dir: Path, yunet_path: Path) -> None:
    paths = {"wav2lip-gan-onnx": str(build_lipsync(tmp_path / "w.onnx")),
             "gfpgan-1.4-onnx": str(build_restorer(tmp_path / "g.onnx"))}
    pipeline = TalkPipeline()
    pipeline.load(PipelineContext(models_dir=yunet_path.parent, settings={
        "model_paths": paths, "talk_restore": "on", "talk_max_side": 192, "talk_motion": False}))
    result = pipeline.run({"image": str(faces_dir / "obama.jpg"), "text": "Hi.", "out": str(tmp_path / "t.mp4")},
                          lambda step, total, text=None: None)
    assert result.meta["restored"] is True and result.meta["animator"] == "wav2lip"
    assert result.files[0].stat().st_size > 1000
