"""Whole-body pose from a DWPose ONNX (SimCC heads, run with onnxruntime) and its OpenPose drawing.

The estimator runs the pose model alone on a person's box; the try-on takes the box from the clothes
parser's person mask, so no person detector is loaded. The model's input size is read from the file
([N, 3, H, W]: 384x288 for dw-ll_ucoco_384) and its two outputs are told apart by length: SimCC
scores per keypoint along x ([N, K, W*r]) and y ([N, K, H*r]), r = 2 for DWPose. Keypoints follow
COCO-WholeBody (17 body, 6 feet, 68 face, 42 hand points); the body's 17 become OpenPose's 18 (the neck
is the shoulders' midpoint) and are drawn as OpenPose draws them, the pictures the openpose
ControlNet was trained on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facechain_core.sessions import open_session

log = logging.getLogger(__name__)

# mmpose's RTMPose preprocessing: RGB, ImageNet mean and std on 0..255, the box grown by a quarter.
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)
BOX_PADDING = 1.25
SCORE_THRESHOLD = 0.3  # below it a keypoint is not drawn (the DWPose annotator's body threshold)

# OpenPose's 18 body points, each from a COCO body point; None: the neck, the shoulders' midpoint.
# OpenPose order: nose, neck, right shoulder/elbow/wrist, left shoulder/elbow/wrist, right hip/knee/ankle,
# left hip/knee/ankle, right eye, left eye, right ear, left ear.
OPENPOSE_FROM_COCO: tuple[int | None, ...] = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
COCO_SHOULDERS = (5, 6)
# OpenPose's limbs (pairs of the 18 points) and its colour wheel: limb i and point i use COLOURS[i].
LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
LIMB_SHADE = 0.6  # OpenPose blends limbs at 60 % over black
REFERENCE_SIDE = 512  # stick width 4 and point radius 4 are OpenPose's at this picture side


@dataclass(frozen=True)
class Pose:
    """Keypoints in picture pixels (K, 2) as (x, y), and their scores (K,)."""

    keypoints: np.ndarray
    scores: np.ndarray

    def confident(self, threshold: float = SCORE_THRESHOLD) -> np.ndarray:
        """Which keypoints score at least `threshold` (bool, K)."""
        return self.scores >= threshold


class PoseEstimator:
    """A DWPose (RTMPose-family) ONNX pose model run on a person's box."""

    def __init__(self, path: Path, device: str = "cpu") -> None:
        self.session = open_session(path, device)
        (model_input,) = self.session.get_inputs()
        shape = model_input.shape
        if len(shape) != 4 or not all(isinstance(v, int) for v in shape[1:]) or shape[1] != 3:
            raise ValueError(f"pose model {path}: expected an input [N, 3, H, W], got {shape}")
        self.input_name = model_input.name
        self.height, self.width = int(shape[2]), int(shape[3])
        lengths = [o.shape[-1] for o in self.session.get_outputs()]
        if len(lengths) != 2 or not all(isinstance(v, int) for v in lengths):
            raise ValueError(f"pose model {path}: expected two SimCC outputs, got lengths {lengths}")
        # SimCC splits each pixel into r bins on both axes: x is the output whose length / W equals r.
        self.x_index = 0 if abs(lengths[0] / self.width - lengths[1] / self.height) < 1e-6 else 1
        self.ratio = lengths[self.x_index] / self.width
        if abs(lengths[1 - self.x_index] / self.height - self.ratio) > 1e-6:
            raise ValueError(f"pose model {path}: output lengths {lengths} do not fit the input {self.width}x"
                             f"{self.height}")

    def estimate(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> Pose:
        """Find the keypoints of the person inside `box` (x0, y0, x1, y1) of an RGB uint8 picture."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an RGB uint8 array (H, W, 3), got {rgb.dtype} {rgb.shape}")
        center, scale = box_center_scale(box, self.width / self.height)
        matrix = crop_matrix(center, scale, (self.width, self.height))
        crop = cv2.warpAffine(rgb, matrix, (self.width, self.height), flags=cv2.INTER_LINEAR)
        tensor = ((crop.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1)[None]
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(tensor)})
        simcc_x, simcc_y = outputs[self.x_index][0], outputs[1 - self.x_index][0]
        in_crop, scores = decode_simcc(simcc_x, simcc_y, self.ratio)
        size = np.array([self.width, self.height], np.float32)
        keypoints = in_crop / size * scale + center - scale / 2.0
        return Pose(keypoints=keypoints.astype(np.float32), scores=scores.astype(np.float32))


# -- pure steps (tested directly) ------------------------------------------------------------------

def person_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """The box (x0, y0, x1, y1) around a bool person mask, in pixel edges; None when the mask is empty."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def box_center_scale(box: tuple[float, float, float, float], aspect: float,
                     padding: float = BOX_PADDING) -> tuple[np.ndarray, np.ndarray]:
    """The box's centre and its padded size grown to the model's width/height `aspect` (mmpose's way)."""
    x0, y0, x1, y1 = box
    center = np.array([(x0 + x1) / 2.0, (y0 + y1) / 2.0], np.float32)
    w, h = (x1 - x0) * padding, (y1 - y0) * padding
    if w > h * aspect:
        h = w / aspect
    else:
        w = h * aspect
    return center, np.array([w, h], np.float32)


def crop_matrix(center: np.ndarray, scale: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The affine map taking the box (centre, scale) of the picture onto a `size` (w, h) crop."""
    sx, sy = size[0] / float(scale[0]), size[1] / float(scale[1])
    x0, y0 = float(center[0] - scale[0] / 2.0), float(center[1] - scale[1] / 2.0)
    return np.array([[sx, 0.0, -x0 * sx], [0.0, sy, -y0 * sy]], np.float32)


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints in crop pixels (K, 2) from SimCC scores (K, W*r) and (K, H*r); score: the lower peak."""
    if simcc_x.ndim != 2 or simcc_y.ndim != 2 or simcc_x.shape[0] != simcc_y.shape[0]:
        raise ValueError(f"SimCC outputs must be (K, L) each, got {simcc_x.shape} and {simcc_y.shape}")
    xs, ys = simcc_x.argmax(axis=1), simcc_y.argmax(axis=1)
    scores = np.minimum(simcc_x.max(axis=1), simcc_y.max(axis=1))
    return np.stack([xs, ys], axis=1).astype(np.float32) / ratio, scores


def openpose_body(pose: Pose) -> Pose:
    """OpenPose's 18 body points of a COCO(-WholeBody) pose; the neck scores as its weaker shoulder."""
    if len(pose.keypoints) < 17:
        raise ValueError(f"expected at least the 17 COCO body keypoints, got {len(pose.keypoints)}")
    points, scores = [], []
    for coco in OPENPOSE_FROM_COCO:
        if coco is None:
            left, right = COCO_SHOULDERS
            points.append((pose.keypoints[left] + pose.keypoints[right]) / 2.0)
            scores.append(min(pose.scores[left], pose.scores[right]))
        else:
            points.append(pose.keypoints[coco])
            scores.append(pose.scores[coco])
    return Pose(keypoints=np.array(points, np.float32), scores=np.array(scores, np.float32))


def draw_openpose(body: Pose, size: tuple[int, int], threshold: float = SCORE_THRESHOLD) -> np.ndarray:
    """Draw OpenPose's 18-point body on black, RGB uint8 of `size` (h, w); weak points and their limbs left out."""
    height, width = size
    canvas = np.zeros((height, width, 3), np.uint8)
    unit = max(height, width) / REFERENCE_SIDE
    stick, radius = max(1, round(4 * unit)), max(1, round(4 * unit))
    seen = body.confident(threshold)
    for index, (a, b) in enumerate(LIMBS):
        if not (seen[a] and seen[b]):
            continue
        (xa, ya), (xb, yb) = body.keypoints[a], body.keypoints[b]
        length = float(np.hypot(xb - xa, yb - ya))
        angle = float(np.degrees(np.arctan2(yb - ya, xb - xa)))
        centre = (int(round((xa + xb) / 2)), int(round((ya + yb) / 2)))
        polygon = cv2.ellipse2Poly(centre, (max(1, int(round(length / 2))), stick), int(round(angle)), 0, 360, 1)
        shade = tuple(int(round(c * LIMB_SHADE)) for c in COLOURS[index])
        cv2.fillConvexPoly(canvas, polygon, shade)
    for index, ((x, y), ok) in enumerate(zip(body.keypoints, seen)):
        if ok:
            cv2.circle(canvas, (int(round(x)), int(round(y))), radius, COLOURS[index], thickness=-1)
    return canvas
