"""DWPose-shaped pose estimation (ONNX through onnxruntime) and its OpenPose drawing, on tiny models
of the real signature: planted keypoints come back at the right picture pixels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facechain_core.errors import UserFacingError
from facechain_core.pose import (COLOURS, LIMB_SHADE, OPENPOSE_FROM_COCO, Pose, PoseEstimator, box_center_scale,
                                 decode_simcc, draw_openpose, openpose_body, person_box)
from facechain_core.tiny.pose import HEIGHT, KEYPOINTS, WIDTH, build_pose
from facechain_core.tiny.tryon import draw_outfit
from facechain_core.tryon import pose_image


def _planted(rng: np.random.Generator) -> np.ndarray:
    """Keypoints on whole half-pixels inside the crop, away from its edges."""
    xs = rng.integers(10, (WIDTH - 10) * 2, KEYPOINTS) / 2.0
    ys = rng.integers(10, (HEIGHT - 10) * 2, KEYPOINTS) / 2.0
    return np.stack([xs, ys], axis=1).astype(np.float32)


def test_estimator_reads_the_signature_and_maps_keypoints_back_to_the_picture(tmp_path: Path) -> None:
    planted = _planted(np.random.default_rng(0))
    estimator = PoseEstimator(build_pose(tmp_path / "pose.onnx", planted=planted))
    assert (estimator.width, estimator.height, estimator.ratio) == (WIDTH, HEIGHT, 2.0)
    picture = np.zeros((300, 500, 3), np.uint8)
    box = (100.0, 40.0, 220.0, 280.0)  # 120 x 240: taller than the model's 3:4, so width grows
    pose = estimator.estimate(picture, box)
    # The padded box is 240 * 1.25 = 300 high and 225 wide (3:4), centred on (160, 160).
    expected_x = 160 - 225 / 2 + planted[:, 0] * 225 / WIDTH
    expected_y = 160 - 300 / 2 + planted[:, 1] * 300 / HEIGHT
    np.testing.assert_allclose(pose.keypoints, np.stack([expected_x, expected_y], 1), atol=1e-3)
    np.testing.assert_allclose(pose.scores, 0.9, atol=1e-6)


def test_box_grows_to_the_models_aspect() -> None:
    center, scale = box_center_scale((0, 0, 100, 100), aspect=0.75)
    np.testing.assert_allclose(center, [50, 50])
    np.testing.assert_allclose(scale, [125, 500 / 3], rtol=1e-6)  # padded to 125, grown (never cut) to 3:4
    _, wide = box_center_scale((0, 0, 300, 100), aspect=0.75)
    np.testing.assert_allclose(wide, [375, 500])


def test_simcc_decoding_takes_each_axis_peak_and_the_weaker_score() -> None:
    x = np.zeros((2, 20), np.float32)
    y = np.zeros((2, 30), np.float32)
    x[0, 7], y[0, 21], x[1, 3], y[1, 4] = 0.8, 0.6, 0.2, 0.9
    points, scores = decode_simcc(x, y, ratio=2.0)
    np.testing.assert_allclose(points, [[3.5, 10.5], [1.5, 2.0]])
    np.testing.assert_allclose(scores, [0.6, 0.2])


def test_person_box_follows_the_mask() -> None:
    mask = np.zeros((50, 60), bool)
    mask[10:31, 5:21] = True
    assert person_box(mask) == (5.0, 10.0, 21.0, 31.0)
    assert person_box(np.zeros((5, 5), bool)) is None


def _coco_pose() -> Pose:
    keypoints = np.zeros((KEYPOINTS, 2), np.float32)
    body = {0: (50, 20), 1: (54, 17), 2: (46, 17), 3: (58, 19), 4: (42, 19), 5: (64, 36), 6: (36, 36),
            7: (70, 56), 8: (30, 56), 9: (72, 76), 10: (28, 76), 11: (58, 80), 12: (42, 80), 13: (60, 100),
            14: (40, 100), 15: (60, 120), 16: (40, 120)}
    for k, xy in body.items():
        keypoints[k] = xy
    scores = np.full(KEYPOINTS, 0.9, np.float32)
    return Pose(keypoints, scores)


def test_openpose_body_orders_the_points_and_adds_the_neck() -> None:
    coco = _coco_pose()
    body = openpose_body(coco)
    assert body.keypoints.shape == (18, 2)
    np.testing.assert_allclose(body.keypoints[1], [50, 36])  # neck: between the shoulders
    np.testing.assert_allclose(body.keypoints[2], coco.keypoints[6])  # OpenPose's right shoulder = COCO 6
    np.testing.assert_allclose(body.keypoints[5], coco.keypoints[5])
    assert [i for i in OPENPOSE_FROM_COCO if i is not None] == [0, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2,
                                                                 1, 4, 3]


def test_drawing_puts_openpose_colours_on_the_points_and_limbs() -> None:
    body = openpose_body(_coco_pose())
    canvas = draw_openpose(body, (140, 100))
    for index in (0, 2, 9, 13):  # nose, right shoulder, right knee, left ankle
        x, y = np.round(body.keypoints[index]).astype(int)
        assert tuple(canvas[y, x]) == COLOURS[index]
    # Limb 6 joins the neck (1) and the right hip (8): its middle has the limb colour at 60 %.
    mid = np.round((body.keypoints[1] + body.keypoints[8]) / 2).astype(int)
    assert tuple(canvas[mid[1], mid[0]]) == tuple(int(round(c * LIMB_SHADE)) for c in COLOURS[6])
    assert canvas[0, 0].sum() == 0 and canvas[139, 99].sum() == 0
    # A weak right wrist takes its point and the forearm off the picture; nothing else changes.
    weak = body.scores.copy()
    weak[4] = 0.1
    without = draw_openpose(Pose(body.keypoints, weak), (140, 100))
    x, y = np.round(body.keypoints[4]).astype(int)
    assert without[y, x].sum() == 0
    assert (np.abs(without.astype(int) - canvas.astype(int)).sum(2) > 0).mean() < 0.05


def test_a_wearer_without_enough_body_points_is_refused(tmp_path: Path) -> None:
    planted = _planted(np.random.default_rng(1))
    scores = np.full(KEYPOINTS, 0.1, np.float32)
    scores[[5, 6]] = 0.9  # the shoulders alone: with the neck, 3 of OpenPose's 18 points
    estimator = PoseEstimator(build_pose(tmp_path / "weak.onnx", planted=planted, planted_scores=scores))
    outfit = draw_outfit(128, seed=2)
    person = np.zeros((128, 128), bool)
    person[20:120, 40:90] = True
    with pytest.raises(UserFacingError) as info:
        pose_image(None, estimator, outfit, person)
    assert info.value.code == "tryon.no_pose"
    with pytest.raises(UserFacingError) as info:
        pose_image(None, estimator, outfit, np.zeros((128, 128), bool))
    assert info.value.code == "tryon.no_person"


def test_different_wearers_give_different_skeletons(tmp_path: Path) -> None:
    estimator = PoseEstimator(build_pose(tmp_path / "pose.onnx"))
    person = np.zeros((128, 128), bool)
    person[10:124, 30:100] = True
    a = np.asarray(pose_image(None, estimator, draw_outfit(128, seed=3), person))
    b = np.asarray(pose_image(None, estimator, draw_outfit(128, arm_angle=1.2, shift=12, seed=3), person))
    assert a.shape == (128, 128, 3) and a.any() and b.any()
    assert np.abs(a.astype(int) - b.astype(int)).sum(2).astype(bool).mean() > 0.01
