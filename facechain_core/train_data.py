"""Training photos for a LoRA: face-centred square crops, upright and eye-level (identity), or the
whole picture centre-cropped square (a style, ``prepare_whole_crops``).

A photo arrives as ``{"path": ..., "face": {"box": [x, y, w, h], "landmarks": [[x, y], ...]}}``
in the photo's own pixels (YuNet's layout: box is left, top, width, height; the first two
landmarks are the eyes). The crop keeps the head and some shoulders, as FaceChain's crops do.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from facechain_core.errors import UserFacingError
from facechain_core.images import to_rgb

logger = logging.getLogger(__name__)

DEFAULT_EXPAND = 2.2  # crop side / face side: head, hair and a little shoulder
MIN_ROTATION_DEG = 2.0  # below this, levelling the eyes costs sharpness for nothing
MAX_ROTATION_DEG = 45.0  # beyond this the landmarks are more likely wrong than the head tilted


@dataclass(frozen=True)
class FaceBox:
    """A face in photo pixels: left, top, width, height, and optional eye points."""

    x: float
    y: float
    w: float
    h: float
    eyes: tuple[tuple[float, float], tuple[float, float]] | None = None

    @property
    def centre(self) -> tuple[float, float]:
        return self.x + self.w / 2, self.y + self.h / 2


def parse_face(face: Any, index: int) -> FaceBox:
    """Read a face (a dict or a ``faces.Face``) of photo `index` or raise train.no_face."""
    record = face if isinstance(face, dict) else {"box": getattr(face, "box", None),
                                                  "landmarks": getattr(face, "landmarks", None)}
    box = record.get("box")
    if not isinstance(box, Sequence) or len(box) != 4:
        raise UserFacingError("train.no_face", index=index + 1)
    x, y, w, h = (float(v) for v in box)
    if not (w > 0 and h > 0 and all(math.isfinite(v) for v in (x, y, w, h))):
        raise UserFacingError("train.no_face", index=index + 1)
    eyes = None
    landmarks = record.get("landmarks")
    if isinstance(landmarks, Sequence) and len(landmarks) >= 2:
        (ax, ay), (bx, by) = landmarks[0][:2], landmarks[1][:2]
        eyes = ((float(ax), float(ay)), (float(bx), float(by)))
    return FaceBox(x, y, w, h, eyes)


def load_photo(path: Path, index: int) -> Image.Image:
    """Open a stored photo upright in RGB or raise train.photo_unreadable."""
    try:
        with Image.open(path) as img:
            img.load()
            upright = ImageOps.exif_transpose(img) or img
            return to_rgb(upright)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        logger.warning("training photo %d unreadable (%s): %s", index + 1, path, exc)
        raise UserFacingError("train.photo_unreadable", index=index + 1) from exc


def eye_angle(face: FaceBox) -> float:
    """Return the tilt of the eye line in degrees (0 when unknown or implausible)."""
    if face.eyes is None:
        return 0.0
    (ax, ay), (bx, by) = sorted(face.eyes)  # left-most eye first, whatever the landmark order
    angle = math.degrees(math.atan2(by - ay, bx - ax))
    return angle if MIN_ROTATION_DEG <= abs(angle) <= MAX_ROTATION_DEG else 0.0


def crop_face(image: Image.Image, face: FaceBox, resolution: int, expand: float = DEFAULT_EXPAND) -> Image.Image:
    """Return a square crop centred on the face, eyes level, resized to resolution."""
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if expand < 1.0:
        raise ValueError(f"expand must be at least 1.0, got {expand}")
    cx, cy = face.centre
    angle = eye_angle(face)
    if angle:
        # PIL turns counter-clockwise for positive angles; image y points down, so this levels the eyes.
        image = image.rotate(angle, resample=Image.Resampling.BICUBIC, center=(cx, cy))
    width, height = image.size
    side = min(max(face.w, face.h) * expand, width, height)
    left = min(max(cx - side / 2, 0.0), width - side)
    top = min(max(cy - side / 2, 0.0), height - side)
    box = (round(left), round(top), round(left + side), round(top + side))
    return image.crop(box).resize((resolution, resolution), Image.Resampling.LANCZOS)


def prepare_crops(photos: Sequence[dict[str, Any]], resolution: int,
                  expand: float = DEFAULT_EXPAND) -> list[Image.Image]:
    """Load every training photo and return its face crop, in order."""
    if not photos:
        raise UserFacingError("train.no_photos")
    crops = []
    for index, photo in enumerate(photos):
        face = parse_face(photo.get("face"), index)
        image = load_photo(Path(photo["path"]), index)
        crops.append(crop_face(image, face, resolution, expand))
    return crops


def crop_whole(image: Image.Image, resolution: int) -> Image.Image:
    """Return the picture's centred square (the most of it a square holds), resized to resolution."""
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    return ImageOps.fit(image, (resolution, resolution), Image.Resampling.LANCZOS)


def prepare_whole_crops(photos: Sequence[dict[str, Any]], resolution: int) -> list[Image.Image]:
    """Load every training picture and return its whole-picture square crop, in order (a style's look
    is the whole picture, not a face)."""
    if not photos:
        raise UserFacingError("train.no_photos")
    return [crop_whole(load_photo(Path(photo["path"]), index), resolution) for index, photo in enumerate(photos)]


def to_pixels(crops: Sequence[Image.Image]) -> torch.Tensor:
    """Stack crops into a float batch (N, 3, H, W) scaled to [-1, 1], as the VAE expects."""
    arrays = np.stack([np.asarray(c, dtype=np.float32) for c in crops])
    pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2)
    return pixels / 127.5 - 1.0


def with_flips(pixels: torch.Tensor) -> torch.Tensor:
    """Append the mirrored copy of every image (a face mirrored is still the same person)."""
    return torch.cat([pixels, pixels.flip(-1)])
