"""Human/clothes parsing -> the garment region to keep, feathered, and a control map of the body.

The parser is a SegFormer semantic-segmentation checkpoint loaded through transformers (e.g.
mattmdjaga/segformer_b2_clothes; any checkpoint whose ``id2label`` names its garment classes works).
Garment classes are found by name, so the label layout is read from the checkpoint, never assumed.

The control map is the wearer's silhouette in the form of a depth map: the distance of each person
pixel to the silhouette's edge, normalised to 0..255 (near = bright, as in MiDaS/ZoeDepth maps), with
the parsed part boundaries drawn darker so arms in front of the body stay visible. The try-on gives it
to a depth ControlNet beside the openpose skeleton (``facechain_core.pose``), so the repainted arms and
legs keep the kept garment's outline without a depth estimator.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

log = logging.getLogger(__name__)

# Normalised label names (lower case, letters only) of the classes kept as "the garment":
# upper (shirt, coat), lower (trousers, skirt) and one-piece (dress, jumpsuit) clothes.
GARMENT_NAMES = frozenset({"upperclothes", "coat", "jacket", "skirt", "pants", "trousers", "dress", "jumpsuits",
                           "jumpsuit", "belt"})
BACKGROUND_NAMES = frozenset({"background", "bg"})
MIN_PERSON_FRACTION = 0.02  # of the picture, below which there is no person to dress
MIN_GARMENT_FRACTION = 0.01


def _norm(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


@dataclass(frozen=True)
class Parsing:
    """What the parser found: per-pixel label ids and the garment and person masks (bool, HxW)."""

    labels: np.ndarray
    garment: np.ndarray
    person: np.ndarray

    @property
    def garment_fraction(self) -> float:
        return float(self.garment.mean())

    @property
    def person_fraction(self) -> float:
        return float(self.person.mean())


class ClothesParser:
    """A SegFormer clothes parser loaded from a local transformers folder."""

    def __init__(self, folder: Path, device: str = "cpu") -> None:
        from transformers import AutoImageProcessor, SegformerForSemanticSegmentation

        self.model = SegformerForSemanticSegmentation.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        self.device = device
        id2label = {int(k): str(v) for k, v in self.model.config.id2label.items()}
        self.garment_ids = sorted(i for i, n in id2label.items() if _norm(n) in GARMENT_NAMES)
        self.background_ids = sorted(i for i, n in id2label.items() if _norm(n) in BACKGROUND_NAMES)
        if not self.garment_ids:
            raise ValueError(f"parser {folder} names no garment class among {sorted(id2label.values())}")

    def parse(self, rgb: np.ndarray) -> Parsing:
        """Label every pixel of an RGB uint8 picture and derive the garment and person masks."""
        import torch

        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an RGB uint8 array (H, W, 3), got {rgb.dtype} {rgb.shape}")
        inputs = self.processor(images=[rgb], return_tensors="pt").to(self.device)
        with torch.no_grad():
            logits = self.model(**inputs).logits
        logits = torch.nn.functional.interpolate(logits.float(), size=rgb.shape[:2], mode="bilinear",
                                                 align_corners=False)
        labels = logits.argmax(1)[0].cpu().numpy().astype(np.int32)
        return Parsing(labels=labels, garment=np.isin(labels, self.garment_ids),
                       person=~np.isin(labels, self.background_ids))


def feather_mask(mask: np.ndarray, dilate_px: int, feather_px: int) -> np.ndarray:
    """Grow a bool mask by `dilate_px`, soften its edge over about `feather_px`; float32 in [0, 1].

    The feather lies outside the dilated mask's edge, so every pixel of the original mask stays 1.
    """
    if dilate_px < 0 or feather_px < 0:
        raise ValueError(f"dilate_px and feather_px must be >= 0, got {dilate_px}, {feather_px}")
    grown = mask.astype(np.uint8)
    if dilate_px:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1, 2 * dilate_px + 1))
        grown = cv2.dilate(grown, kernel)
    if not feather_px:
        return grown.astype(np.float32)
    # Distance outside the grown mask, mapped to a smooth fall-off from 1 to 0 over feather_px.
    outside = cv2.distanceTransform((1 - grown).astype(np.uint8), cv2.DIST_L2, 5)
    ramp = np.clip(1.0 - outside / float(feather_px), 0.0, 1.0)
    return (ramp * ramp * (3.0 - 2.0 * ramp)).astype(np.float32)  # smoothstep


def control_map(parsing: Parsing) -> np.ndarray:
    """A depth-like RGB uint8 map of the person (see the module docstring); black background."""
    person = parsing.person.astype(np.uint8)
    depth = cv2.distanceTransform(person, cv2.DIST_L2, 5)
    if depth.max() > 0:
        depth = np.sqrt(depth / depth.max())
    grey = (depth * 255.0).astype(np.float32)
    edges = cv2.Canny(parsing.labels.astype(np.uint8), 0, 1) > 0
    grey[edges & parsing.person] *= 0.6
    grey = np.clip(grey, 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def parser_summary(parsing: Parsing) -> dict[str, Any]:
    """JSON-able numbers of a parsing for logs and job metadata."""
    return {"garment_fraction": round(parsing.garment_fraction, 4),
            "person_fraction": round(parsing.person_fraction, 4)}
