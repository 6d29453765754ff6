"""Face detection behind one small interface: YuNet (OpenCV) or SCRFD (onnxruntime).

Detectors take an 8-bit RGB array and return faces in that array's pixel coordinates, largest
first. Landmarks are five points in YuNet's order, which is also insightface's: the eye on the
image's left (the subject's right eye), the other eye, the nose tip, then the mouth corners in
the same left-to-right order. Create a detector once and reuse it; both are safe to share
between threads.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

logger = logging.getLogger(__name__)

YUNET_MAX_SIDE = 640
SCRFD_INPUT_SIZE = (640, 640)
# Output count -> (strides, anchors per cell) for insightface SCRFD exports with keypoints.
_SCRFD_LAYOUTS = {9: ((8, 16, 32), 2), 15: ((8, 16, 32, 64, 128), 1)}


@dataclass
class Face:
    """One detected face: box (x, y, w, h), five landmarks and the detector's confidence."""

    box: tuple[float, float, float, float]
    landmarks: list[tuple[float, float]]
    score: float

    @property
    def area(self) -> float:
        return self.box[2] * self.box[3]

    def scaled(self, factor: float) -> Face:
        """Return this face with every coordinate multiplied by factor."""
        x, y, w, h = self.box
        return Face(
            box=(x * factor, y * factor, w * factor, h * factor),
            landmarks=[(px * factor, py * factor) for px, py in self.landmarks],
            score=self.score,
        )


class FaceDetector(Protocol):
    """Finds faces in an RGB uint8 array of shape (H, W, 3); largest face first."""

    def detect(self, rgb: np.ndarray) -> list[Face]: ...


class YuNetDetector:
    """YuNet through cv2.FaceDetectorYN, run at no more than 640 px on the long side."""

    def __init__(self, model_path: str | Path, score_threshold: float = 0.7,
                 nms_threshold: float = 0.3, max_side: int = YUNET_MAX_SIDE) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"YuNet model not found: {path}")
        self.max_side = max_side
        self._net = cv2.FaceDetectorYN.create(str(path), "", (max_side, max_side),
                                              score_threshold, nms_threshold)
        # FaceDetectorYN keeps the input size as state and its Net is not reentrant.
        self._lock = threading.Lock()

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Detect faces in an RGB array; coordinates are in the array's own pixels."""
        _check_rgb(rgb)
        height, width = rgb.shape[:2]
        factor = min(1.0, self.max_side / max(height, width))
        small = rgb
        if factor < 1.0:
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        bgr = cv2.cvtColor(small, cv2.COLOR_RGB2BGR)
        with self._lock:
            self._net.setInputSize((bgr.shape[1], bgr.shape[0]))
            _, rows = self._net.detect(bgr)
        if rows is None:
            return []
        sx, sy = width / bgr.shape[1], height / bgr.shape[0]
        faces = [
            Face(
                box=(float(r[0]) * sx, float(r[1]) * sy, float(r[2]) * sx, float(r[3]) * sy),
                landmarks=[(float(r[4 + 2 * i]) * sx, float(r[5 + 2 * i]) * sy) for i in range(5)],
                score=float(r[14]),
            )
            for r in rows
        ]
        return sorted(faces, key=lambda f: f.area, reverse=True)


class ScrfdDetector:
    """An insightface SCRFD ONNX export (det_10g, det_500m layout) run with onnxruntime."""

    def __init__(self, model_path: str | Path, score_threshold: float = 0.5,
                 nms_threshold: float = 0.4, input_size: tuple[int, int] = SCRFD_INPUT_SIZE,
                 providers: list[str] | None = None) -> None:
        import onnxruntime

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"SCRFD model not found: {path}")
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self._session = onnxruntime.InferenceSession(
            str(path), providers=providers or ["CPUExecutionProvider"])
        model_input = self._session.get_inputs()[0]
        self._input_name = model_input.name
        fixed = model_input.shape[2:4]
        # A fixed-size export dictates the input; a dynamic one takes the configured size.
        self.input_size = (fixed[1], fixed[0]) if all(isinstance(d, int) for d in fixed) else input_size
        outputs = self._session.get_outputs()
        if len(outputs) not in _SCRFD_LAYOUTS:
            raise ValueError(f"not an SCRFD export with keypoints: {len(outputs)} outputs, "
                             f"expected one of {sorted(_SCRFD_LAYOUTS)}")
        self._output_names = [o.name for o in outputs]
        self.strides, self.num_anchors = _SCRFD_LAYOUTS[len(outputs)]
        self._centers: dict[tuple[int, int, int], np.ndarray] = {}
        self._centers_lock = threading.Lock()

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Detect faces in an RGB array; coordinates are in the array's own pixels."""
        _check_rgb(rgb)
        blob, det_scale = self._prepare(rgb)
        outs = self._session.run(self._output_names, {self._input_name: blob})
        boxes, kps, scores = self._decode(outs)
        keep = _nms(boxes, scores, self.nms_threshold)
        faces = []
        for i in keep:
            x1, y1, x2, y2 = (boxes[i] / det_scale).tolist()
            points = (kps[i] / det_scale).reshape(5, 2)
            faces.append(Face(box=(x1, y1, x2 - x1, y2 - y1),
                              landmarks=[(float(px), float(py)) for px, py in points],
                              score=float(scores[i])))
        return sorted(faces, key=lambda f: f.area, reverse=True)

    def _prepare(self, rgb: np.ndarray) -> tuple[np.ndarray, float]:
        """Letterbox into the input size at the top-left, as insightface trained and exported it."""
        in_w, in_h = self.input_size
        height, width = rgb.shape[:2]
        if height / width > in_h / in_w:
            new_h, new_w = in_h, max(1, int(in_h * width / height))
        else:
            new_w, new_h = in_w, max(1, int(in_w * height / width))
        det_scale = new_h / height
        canvas = np.zeros((in_h, in_w, 3), dtype=np.float32)
        canvas[:new_h, :new_w] = cv2.resize(rgb, (new_w, new_h))
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]
        return np.ascontiguousarray(blob, dtype=np.float32), det_scale

    def _decode(self, outs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Turn per-stride scores, box distances and keypoint offsets into image coordinates."""
        in_w, in_h = self.input_size
        levels = len(self.strides)
        all_boxes, all_kps, all_scores = [], [], []
        for level, stride in enumerate(self.strides):
            # Batched exports add a leading axis, (1, N, k) for (N, k): reshape drops it.
            scores, dist, offsets = (outs[level + k * levels] for k in range(3))
            centers = self._anchor_centers(in_h // stride, in_w // stride, stride)
            hit = scores.reshape(-1) >= self.score_threshold
            c = centers[hit]
            d = dist.reshape(-1, 4)[hit] * stride
            o = offsets.reshape(-1, 10)[hit] * stride
            all_boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], axis=1))
            all_kps.append(np.tile(c, 5) + o)
            all_scores.append(scores.reshape(-1)[hit])
        return (np.concatenate(all_boxes).astype(np.float32), np.concatenate(all_kps).astype(np.float32),
                np.concatenate(all_scores).astype(np.float32))

    def _anchor_centers(self, rows: int, cols: int, stride: int) -> np.ndarray:
        key = (rows, cols, stride)
        with self._centers_lock:
            if key not in self._centers:
                ys, xs = np.mgrid[:rows, :cols]
                grid = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
                # Anchors of one cell are consecutive rows of the outputs.
                self._centers[key] = np.repeat(grid, self.num_anchors, axis=0)
            return self._centers[key]


def create_detector(kind: str, model_path: str | Path, **options: Any) -> FaceDetector:
    """Build the detector named by kind ("yunet" or "scrfd") from its ONNX file."""
    if kind == "yunet":
        return YuNetDetector(model_path, **options)
    if kind == "scrfd":
        return ScrfdDetector(model_path, **options)
    raise ValueError(f"unknown face detector kind {kind!r}, expected 'yunet' or 'scrfd'")


def _check_rgb(rgb: np.ndarray) -> None:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 array (H, W, 3), got {rgb.dtype} {rgb.shape}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"expected a non-empty image, got shape {rgb.shape}")


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Return indices kept by greedy non-maximum suppression over (x1, y1, x2, y2) boxes."""
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        low = np.maximum(boxes[i, :2], boxes[rest, :2])
        high = np.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(high - low, 0, None), axis=1)
        overlap = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[overlap <= threshold]
    return keep
