"""The selfie check: is this photo a usable picture of one person's face?

`check_selfie` decodes the upload safely, finds the faces and either returns the upright
original with its main face, or raises a UserFacingError naming the one thing to fix. It is
pure CPU work with no shared state beyond the (thread-safe) detector: run it in a thread.

Checks, in order (the first failure wins): decodable still image, at least one face (a face-less
photo that is very dark is reported as too dark), one face or one clearly dominant face, face big
enough, face not cut by the frame, face lit well enough, face sharp enough. Darkness is checked
before sharpness because a dark photo also has little contrast to measure sharpness by.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image

from facechain_core.errors import UserFacingError
from facechain_core.faces import Face, FaceDetector
from facechain_core.images import decode_image, downscale

logger = logging.getLogger(__name__)

# Face crops are measured at one size so that sharpness means the same for any photo size.
MEASURE_SIDE = 128
BRIGHTNESS_PERCENTILE = 90


@dataclass(frozen=True)
class SelfieThresholds:
    """Limits a selfie must meet; defaults tuned on real photos (see tests/test_selfie.py)."""

    min_face_px: int = 64  # the face box's shorter side, in original pixels
    min_face_fraction: float = 0.08  # the face box's longer side over the photo's longer side
    dominance_ratio: float = 4.0  # the main face's area over the next largest face's area
    min_edge_margin: float = 0.02  # face box to frame gap over the face size; negative turns it off
    min_sharpness: float = 50.0  # variance of the Laplacian of the face at 128x128 grey
    min_brightness: float = 40.0  # 90th percentile of the face's luma, 0..255
    max_side_for_detection: int = 1280

    def __post_init__(self) -> None:
        if self.min_face_px < 1:
            raise ValueError(f"min_face_px must be at least 1, got {self.min_face_px}")
        if not 0.0 <= self.min_face_fraction <= 1.0:
            raise ValueError(f"min_face_fraction must be within 0..1, got {self.min_face_fraction}")
        if self.dominance_ratio < 1.0:
            raise ValueError(f"dominance_ratio must be at least 1, got {self.dominance_ratio}")
        if self.max_side_for_detection < 32:
            raise ValueError(f"max_side_for_detection must be at least 32, got {self.max_side_for_detection}")


@dataclass
class SelfieResult:
    """An accepted selfie: the upright original, its main face and the measured quality."""

    image: Image.Image  # RGB, EXIF orientation applied, original resolution
    face: Face  # in `image` pixel coordinates
    faces_found: int
    sharpness: float
    brightness: float


def check_selfie(data: bytes, detector: FaceDetector, thresholds: SelfieThresholds, *,
                 max_bytes: int, max_pixels: int) -> SelfieResult:
    """Decode and judge an uploaded selfie; raise UserFacingError with the reason to reject."""
    image = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    faces = detect_faces(image, detector, thresholds.max_side_for_detection)
    if not faces:
        brightness = measure_brightness(image)
        if brightness < thresholds.min_brightness:
            raise UserFacingError("selfie.too_dark", brightness=round(brightness, 1))
        raise UserFacingError("selfie.no_face")
    face = pick_main_face(faces, thresholds.dominance_ratio)
    _check_geometry(face, image.size, thresholds)
    crop = crop_face(image, face)
    brightness = measure_brightness(crop)
    if brightness < thresholds.min_brightness:
        raise UserFacingError("selfie.too_dark", brightness=round(brightness, 1))
    sharpness = measure_sharpness(crop)
    if sharpness < thresholds.min_sharpness:
        raise UserFacingError("selfie.too_blurry", sharpness=round(sharpness, 1))
    logger.debug("selfie accepted: %d face(s), sharpness %.1f, brightness %.1f",
                 len(faces), sharpness, brightness)
    return SelfieResult(image=image, face=face, faces_found=len(faces),
                        sharpness=sharpness, brightness=brightness)


def detect_faces(image: Image.Image, detector: FaceDetector, max_side: int) -> list[Face]:
    """Detect on a downscaled copy and return faces in the image's own coordinates, largest first."""
    small = downscale(image, max_side)
    faces = detector.detect(np.asarray(small))
    if small.size != image.size:
        faces = [f.scaled(image.width / small.width) for f in faces]
    return sorted(faces, key=lambda f: f.area, reverse=True)


def pick_main_face(faces: list[Face], dominance_ratio: float) -> Face:
    """Return the largest face if it clearly dominates the next; otherwise reject as several faces."""
    ranked = sorted(faces, key=lambda f: f.area, reverse=True)
    if len(ranked) > 1 and ranked[0].area < dominance_ratio * ranked[1].area:
        raise UserFacingError("selfie.several_faces", count=len(ranked))
    return ranked[0]


def crop_face(image: Image.Image, face: Face) -> np.ndarray:
    """Return the face box, clamped to the image, as a grey uint8 array."""
    x, y, w, h = face.box
    left, top = max(0, int(x)), max(0, int(y))
    right, bottom = min(image.width, int(round(x + w))), min(image.height, int(round(y + h)))
    if right <= left or bottom <= top:
        raise UserFacingError("selfie.face_too_small", face_px=0)
    return np.asarray(image.crop((left, top, right, bottom)).convert("L"))


def measure_sharpness(grey: np.ndarray) -> float:
    """Return the variance of the Laplacian of a grey crop resized to MEASURE_SIDE square."""
    shrinking = min(grey.shape[:2]) >= MEASURE_SIDE
    resized = cv2.resize(grey, (MEASURE_SIDE, MEASURE_SIDE),
                         interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return float(cv2.Laplacian(resized, cv2.CV_64F).var())


def measure_brightness(pixels: np.ndarray | Image.Image) -> float:
    """Return the 90th percentile of luma (0..255): how bright the lit part is, fair to dark skin."""
    grey = np.asarray(pixels.convert("L")) if isinstance(pixels, Image.Image) else pixels
    return float(np.percentile(grey, BRIGHTNESS_PERCENTILE))


def face_record(result: SelfieResult) -> dict[str, Any]:
    """Return what storage keeps about an accepted selfie, as a JSON-able dict."""
    face = result.face
    return {
        "box": [round(v, 2) for v in face.box],
        "landmarks": [[round(px, 2), round(py, 2)] for px, py in face.landmarks],
        "score": round(face.score, 4),
        "width": result.image.width,
        "height": result.image.height,
        "faces_found": result.faces_found,
        "sharpness": round(result.sharpness, 2),
        "brightness": round(result.brightness, 2),
    }


def _check_geometry(face: Face, size: tuple[int, int], thresholds: SelfieThresholds) -> None:
    width, height = size
    x, y, w, h = face.box
    if min(w, h) < thresholds.min_face_px or max(w, h) / max(width, height) < thresholds.min_face_fraction:
        raise UserFacingError("selfie.face_too_small", face_px=round(min(w, h)))
    gap = min(x, y, width - (x + w), height - (y + h))
    # Detectors clamp a face that leaves the frame to the border, so touching it means cut.
    if gap < thresholds.min_edge_margin * max(w, h):
        raise UserFacingError("selfie.face_cut_off")
