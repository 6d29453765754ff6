"""Group layouts (``poses/groups/<id>.toml``): two to four OpenPose skeletons and one region per person.

A layout gives each person's OpenPose body points (as ``poses/*.toml`` does, fractions of a frame whose
width/height is ``aspect``), left to right. ``GroupLayout.pose_map`` draws every skeleton into one picture
for the openpose ControlNet (fitted without stretching, ``facechain_core.poses.fit_skeleton``);
``region_masks`` splits the picture into one column band per person, the band edges halfway between
neighbours and snapped to the UNet's coarsest attention grid, so that diffusers' bicubic downsampling of
an IP-Adapter mask stays exactly 0 or 1 at every attention resolution (``mask_side_factor``).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from facechain_core.datafiles import REPO_ROOT, load_folder, match_key
from facechain_core.pose import Pose, draw_openpose
from facechain_core.poses import MIN_POINTS, POINT_NAMES, fit_skeleton
from facechain_core.styles import ID_PATTERN, LocalizedText

DEFAULT_GROUPS_DIR = REPO_ROOT / "poses" / "groups"
MIN_PEOPLE, MAX_PEOPLE = 2, 4
# A mask this many times the latent size: every attention level downsamples it by at least 4, and bicubic
# sampling at a block's centre then reads only that block's pixels.
MASK_LATENT_FACTOR = 4


class GroupLayout(BaseModel):
    """One group layout of the library."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=ID_PATTERN)
    name: LocalizedText
    aspect: float = Field(gt=0.2, lt=5.0)
    sort: int = 100
    people: int = Field(ge=MIN_PEOPLE, le=MAX_PEOPLE)
    person: list[dict[str, tuple[float, float]]]

    @field_validator("person")
    @classmethod
    def _check_people(cls, value: list[dict[str, tuple[float, float]]]) -> list[dict[str, tuple[float, float]]]:
        for index, points in enumerate(value, start=1):
            unknown = sorted(set(points) - set(POINT_NAMES))
            if unknown:
                raise ValueError(f"person {index}: unknown point names {unknown}; known: {', '.join(POINT_NAMES)}")
            outside = sorted(n for n, (x, y) in points.items() if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0))
            if outside:
                raise ValueError(f"person {index}: points must lie within 0..1 of the frame, not {outside}")
            if len(points) < MIN_POINTS or "nose" not in points:
                raise ValueError(f"person {index}: needs a nose and at least {MIN_POINTS} points")
        centres = [float(np.mean([x for x, _ in p.values()])) for p in value]
        if centres != sorted(centres):
            raise ValueError("people must be listed left to right")
        return value

    def model_post_init(self, _: object) -> None:
        if len(self.person) != self.people:
            raise ValueError(f"people = {self.people} but {len(self.person)} [[person]] tables")

    def display_name(self, lang: str | None = None) -> str:
        return self.name.get(lang)

    def skeletons(self) -> tuple[list[Pose], tuple[float, float]]:
        """Each person's points as a Pose in a frame of height 1 and width `aspect`, and that frame's (w, h)."""
        bodies = []
        for points in self.person:
            keypoints = np.zeros((len(POINT_NAMES), 2), np.float32)
            scores = np.zeros(len(POINT_NAMES), np.float32)
            for index, name in enumerate(POINT_NAMES):
                if name in points:
                    x, y = points[name]
                    keypoints[index] = (x * self.aspect, y)
                    scores[index] = 1.0
            bodies.append(Pose(keypoints, scores))
        return bodies, (self.aspect, 1.0)

    def pose_map(self, size: tuple[int, int]) -> np.ndarray:
        """Every skeleton drawn as OpenPose draws, into one RGB uint8 picture of `size` (w, h)."""
        bodies, frame = self.skeletons()
        canvas = np.zeros((size[1], size[0], 3), np.uint8)
        for body in bodies:
            canvas = np.maximum(canvas, draw_openpose(fit_skeleton(body, frame, size), (size[1], size[0])))
        return canvas

    def centres(self, size: tuple[int, int]) -> list[float]:
        """Each person's x centre (the mean of their points) in pixels of a picture of `size` (w, h)."""
        bodies, frame = self.skeletons()
        fitted = [fit_skeleton(b, frame, size) for b in bodies]
        return [float(b.keypoints[b.scores > 0, 0].mean()) for b in fitted]


class GroupLibrary:
    """The group layouts in menu order (sort, then id), found by id or name in either language."""

    def __init__(self, layouts: list[GroupLayout]) -> None:
        self._layouts = sorted(layouts, key=lambda p: (p.sort, p.id))
        self._by_key: dict[str, GroupLayout] = {}
        for layout in self._layouts:
            for key in (layout.id, layout.name.en, layout.name.zh):
                self._by_key.setdefault(match_key(key), layout)

    def __iter__(self) -> Iterator[GroupLayout]:
        return iter(self._layouts)

    def __len__(self) -> int:
        return len(self._layouts)

    def get(self, layout_id: str) -> GroupLayout | None:
        return next((p for p in self._layouts if p.id == layout_id), None)

    def find(self, text: str) -> GroupLayout | None:
        return self._by_key.get(match_key(text))

    def for_people(self, people: int) -> list[GroupLayout]:
        """The layouts for exactly `people` people, menu order."""
        return [p for p in self._layouts if p.people == people]


def load_groups(folder: Path = DEFAULT_GROUPS_DIR) -> GroupLibrary:
    """Every group layout file of `folder`; raises DataFileError naming each bad file and key."""
    return GroupLibrary(load_folder(folder, GroupLayout))


def column_bounds(centres: list[float], width: int, cell: int) -> list[int]:
    """Band edges (len(centres) + 1 of them, 0 .. width) halfway between neighbouring centres, on multiples of
    `cell`; every band keeps at least one cell."""
    if width % cell:
        raise ValueError(f"width {width} is not a multiple of the cell {cell}")
    cells = width // cell
    if cells < len(centres):
        raise ValueError(f"{len(centres)} people need at least {len(centres)} cells, the picture has {cells}")
    edges = [0]
    for index, (left, right) in enumerate(zip(centres, centres[1:]), start=1):
        edge = int(round((left + right) / 2 / cell))
        edge = min(max(edge, edges[-1] + 1), cells - (len(centres) - index))
        edges.append(edge)
    edges.append(cells)
    return [e * cell for e in edges]


def region_masks(layout: GroupLayout, size: tuple[int, int], latent_factor: int, levels: int) -> np.ndarray:
    """One bool mask per person (n, H, W) over a mask picture MASK_LATENT_FACTOR times the latent size.

    `latent_factor` is the VAE's downscale, `levels` the UNet's resolutions (len(block_out_channels)): band
    edges fall on the coarsest attention grid, so each mask is whole blocks at every attention level.
    """
    width, height = size
    if width % latent_factor or height % latent_factor:
        raise ValueError(f"size {size} must be a multiple of the VAE factor {latent_factor}")
    mask_w, mask_h = width // latent_factor * MASK_LATENT_FACTOR, height // latent_factor * MASK_LATENT_FACTOR
    cell = MASK_LATENT_FACTOR * 2 ** (levels - 1)
    scale = mask_w / width
    bounds = column_bounds([c * scale for c in layout.centres(size)], mask_w, cell)
    masks = np.zeros((layout.people, mask_h, mask_w), bool)
    for index in range(layout.people):
        masks[index, :, bounds[index]:bounds[index + 1]] = True
    return masks
