"""Face identity: alignment to the ArcFace template, embeddings, identity files, the identity job."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from facechain_core.errors import ModelNotInstalled, UserFacingError
from facechain_core.identity import (
    ARCFACE_TEMPLATE,
    ArcFace,
    IdentityPipeline,
    align_face,
    alignment_matrix,
    build_identity,
    crop_path_for,
    load_identity,
    load_rgb,
    save_identity,
    template_for,
)
from facechain_core.pipeline import PipelineContext
from facechain_core.tiny import build_arcface


@pytest.fixture(scope="module")
def arcface_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_arcface(tmp_path_factory.mktemp("arcface") / "w600k_r50.onnx")


def _similarity(scale: float, degrees: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[scale * math.cos(a), -scale * math.sin(a), tx],
                     [scale * math.sin(a), scale * math.cos(a), ty]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _face_record(detector, rgb: np.ndarray) -> dict:
    (face,) = detector.detect(rgb)
    return {"box": list(face.box), "landmarks": [list(p) for p in face.landmarks], "score": face.score}


def test_alignment_maps_similar_landmarks_exactly_onto_the_template():
    # Landmarks of a face scaled by 2.5, turned by 17 degrees and moved: the inverse must be recovered.
    forward = _similarity(2.5, 17.0, 140.0, 60.0)
    landmarks = _apply(forward, ARCFACE_TEMPLATE)
    matrix = alignment_matrix(landmarks)
    np.testing.assert_allclose(_apply(matrix, landmarks), ARCFACE_TEMPLATE, atol=1e-3)
    np.testing.assert_allclose(_apply(alignment_matrix(landmarks, 224), landmarks), ARCFACE_TEMPLATE * 2, atol=1e-3)


def test_align_face_puts_the_eyes_on_the_template_pixels():
    forward = _similarity(3.0, -12.0, 90.0, 40.0)
    landmarks = _apply(forward, ARCFACE_TEMPLATE)
    image = np.zeros((500, 500, 3), np.uint8)
    for (x, y), colour in zip(landmarks[:2], ((255, 0, 0), (0, 255, 0)), strict=True):
        cv2.circle(image, (round(x), round(y)), 6, colour, -1)
    crop = align_face(image, landmarks)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    for channel, expected in ((0, ARCFACE_TEMPLATE[0]), (1, ARCFACE_TEMPLATE[1])):
        ys, xs = np.nonzero(crop[:, :, channel] > 128)
        assert len(xs) > 0
        assert abs(xs.mean() - expected[0]) < 1.0 and abs(ys.mean() - expected[1]) < 1.0


def test_align_face_on_a_real_photo_lands_near_the_template(faces_dir, yunet_path):
    from facechain_core.faces import YuNetDetector

    rgb = load_rgb(faces_dir / "obama.jpg")
    (face,) = YuNetDetector(yunet_path).detect(rgb)
    matrix = alignment_matrix(face.landmarks)
    moved = _apply(matrix, np.asarray(face.landmarks))
    # Five real points never fit a similarity exactly; the eyes still land within a few pixels.
    assert np.abs(moved[:2] - ARCFACE_TEMPLATE[:2]).max() < 4.0
    assert align_face(rgb, face.landmarks).shape == (112, 112, 3)


def test_template_for_other_sizes_follows_insightface():
    np.testing.assert_allclose(template_for(224), ARCFACE_TEMPLATE * 2)
    np.testing.assert_allclose(template_for(128)[0], ARCFACE_TEMPLATE[0] + [8.0, 0.0])
    with pytest.raises(ValueError, match="multiple of 112 or 128"):
        template_for(100)


def test_arcface_embeddings_are_unit_and_input_dependent(arcface_path):
    arcface = ArcFace(arcface_path)
    assert (arcface.input_mean, arcface.input_std) == (127.5, 127.5)  # no Sub/Mul inside, as w600k_r50
    rng = np.random.default_rng(1)
    crops = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(2)]
    first = arcface.embed(crops)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(first, arcface.embed(crops))
    assert not np.allclose(first[0], first[1])
    with pytest.raises(ValueError, match="112x112"):
        arcface.embed([np.zeros((64, 64, 3), np.uint8)])


def test_identity_from_two_photos_round_trips(faces_dir, yunet_path, arcface_path, tmp_path):
    from facechain_core.faces import YuNetDetector

    detector, arcface = YuNetDetector(yunet_path), ArcFace(arcface_path)
    selfies = [(faces_dir / name, _face_record(detector, load_rgb(faces_dir / name)))
               for name in ("obama.jpg", "obama2.jpg")]
    identity = build_identity(selfies, arcface)
    assert identity.photos == 2 and identity.photo_embeddings.shape == (2, 512)
    assert math.isclose(float(np.linalg.norm(identity.embedding)), 1.0, rel_tol=1e-5)
    mean = identity.photo_embeddings.mean(axis=0)
    np.testing.assert_allclose(identity.embedding, mean / np.linalg.norm(mean), rtol=1e-5)
    assert identity.crop.shape == (224, 224, 3)

    path = save_identity(identity, tmp_path / "user" / "identity.npz")
    loaded = load_identity(path)
    np.testing.assert_array_equal(loaded.embedding, identity.embedding)
    np.testing.assert_array_equal(loaded.photo_embeddings, identity.photo_embeddings)
    np.testing.assert_array_equal(loaded.crop, identity.crop)
    # Nothing but the user's own data: two arrays and the face crop.
    with np.load(path) as data:
        assert set(data.files) == {"embedding", "photo_embeddings"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["identity.npz", crop_path_for(path).name]


def test_build_identity_reports_user_errors(arcface_path, tmp_path):
    arcface = ArcFace(arcface_path)
    with pytest.raises(UserFacingError) as info:
        build_identity([], arcface)
    assert info.value.code == "identity.no_selfies"
    photo = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(photo)
    with pytest.raises(UserFacingError) as info:
        build_identity([(photo, {"box": [0, 0, 10, 10]})], arcface)
    assert (info.value.code, info.value.details) == ("identity.no_face", {"index": 1})
    broken = tmp_path / "b.jpg"
    broken.write_bytes(b"not a jpeg")
    face = {"landmarks": ARCFACE_TEMPLATE.tolist()}
    with pytest.raises(UserFacingError) as info:
        build_identity([(photo, face), (broken, face)], arcface)
    assert (info.value.code, info.value.details) == ("identity.bad_photo", {"index": 2})


def test_identity_pipeline_job(faces_dir, yunet_path, arcface_path, tmp_path):
    from facechain_core.faces import YuNetDetector

    detector = YuNetDetector(yunet_path)
    pipeline = IdentityPipeline()
    pipeline.load(PipelineContext(models_dir=tmp_path, settings={"arcface_path": str(arcface_path)}))
    selfies = [{"path": str(faces_dir / n), "face": _face_record(detector, load_rgb(faces_dir / n))}
               for n in ("obama.jpg", "obama2.jpg", "obama3.jpg")]
    steps: list[tuple[int, int]] = []
    out = tmp_path / "users" / "telegram:1" / "identity.npz"
    result = pipeline.run({"selfies": selfies, "out": str(out)}, lambda s, t, text=None: steps.append((s, t)))
    assert result.files == [out] and result.meta == {"photos": 3}
    assert load_identity(out).photos == 3
    assert steps[-1] == (2, 2)


def test_identity_pipeline_without_arcface_is_not_installed(tmp_path):
    with pytest.raises(ModelNotInstalled) as info:
        IdentityPipeline().load(PipelineContext(models_dir=tmp_path, settings={"arcface_path": str(tmp_path / "x")}))
    assert info.value.code == "model.not_installed" and info.value.details["model"] == "arcface"
