"""The pose library (``poses/<id>.toml``: an OpenPose body skeleton each) and pose maps for any picture size.

A pose file gives OpenPose's named body points as (x, y) fractions of a frame whose width/height is
``aspect``; points left out are not drawn. ``pose_map`` fits a skeleton into a picture of another size
*without stretching* (scaled to fit, centred: the ControlNet sees the same body proportions), then
draws it as OpenPose does (``facechain_core.pose.draw_openpose``). ``photo_skeleton`` copies the pose of
a photo through DWPose (``facechain_core.pose.PoseEstimator``).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from facechain_core.datafiles import REPO_ROOT, load_folder, match_key
from facechain_core.pose import Pose, PoseEstimator, draw_openpose, openpose_body
from facechain_core.styles import ID_PATTERN, LocalizedText

DEFAULT_POSES_DIR = REPO_ROOT / "poses"
# OpenPose's 18 body points in its order (facechain_core.pose.OPENPOSE_FROM_COCO).
POINT_NAMES = ("nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist", "r_hip",
               "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear")
MIN_POINTS = 4  # a skeleton with fewer confident points holds no pose


class PoseEntry(BaseModel):
    """One pose of the library."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=ID_PATTERN)
    name: LocalizedText
    aspect: float = Field(gt=0.2, lt=5.0)
    sort: int = 100
    points: dict[str, tuple[float, float]]

    @field_validator("points")
    @classmethod
    def _check_points(cls, value: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        unknown = sorted(set(value) - set(POINT_NAMES))
        if unknown:
            raise ValueError(f"unknown point names {unknown}; known: {', '.join(POINT_NAMES)}")
        outside = sorted(n for n, (x, y) in value.items() if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0))
        if outside:
            raise ValueError(f"points must lie within 0..1 of the frame, not {outside}")
        if len(value) < MIN_POINTS:
            raise ValueError(f"a pose needs at least {MIN_POINTS} points, got {len(value)}")
        return value

    def display_name(self, lang: str | None = None) -> str:
        return self.name.get(lang)

    def skeleton(self) -> tuple[Pose, tuple[float, float]]:
        """The points as a Pose in a frame of height 1 and width `aspect`, and that frame's (w, h)."""
        points = np.zeros((len(POINT_NAMES), 2), np.float32)
        scores = np.zeros(len(POINT_NAMES), np.float32)
        for index, name in enumerate(POINT_NAMES):
            if name in self.points:
                x, y = self.points[name]
                points[index] = (x * self.aspect, y)
                scores[index] = 1.0
        return Pose(points, scores), (self.aspect, 1.0)


class PoseLibrary:
    """The poses in menu order (sort, then id), found by id or name in either language."""

    def __init__(self, poses: list[PoseEntry]) -> None:
        self._poses = sorted(poses, key=lambda p: (p.sort, p.id))
        self._by_key = {}
        for pose in self._poses:
            for key in (pose.id, pose.name.en, pose.name.zh):
                self._by_key.setdefault(match_key(key), pose)

    def __iter__(self) -> Iterator[PoseEntry]:
        return iter(self._poses)

    def __len__(self) -> int:
        return len(self._poses)

    def get(self, pose_id: str) -> PoseEntry | None:
        return next((p for p in self._poses if p.id == pose_id), None)

    def find(self, text: str) -> PoseEntry | None:
        """The pose whose id or name (any language, any case, '_' or ' ' or '-') is `text`."""
        return self._by_key.get(match_key(text))



def load_poses(folder: Path = DEFAULT_POSES_DIR) -> PoseLibrary:
    """Every pose file of `folder`; raises DataFileError naming each bad file and key."""
    return PoseLibrary(load_folder(folder, PoseEntry))


def fit_skeleton(body: Pose, frame: tuple[float, float], size: tuple[int, int]) -> Pose:
    """Map a skeleton drawn in `frame` (w, h) into a picture of `size` (w, h): scaled to fit, centred."""
    (fw, fh), (width, height) = frame, size
    if fw <= 0 or fh <= 0:
        raise ValueError(f"frame must have a positive size, got {frame}")
    scale = min(width / fw, height / fh)
    offset = np.array([(width - fw * scale) / 2.0, (height - fh * scale) / 2.0], np.float32)
    return Pose(body.keypoints * scale + offset, body.scores)


def pose_map(body: Pose, frame: tuple[float, float], size: tuple[int, int]) -> np.ndarray:
    """The OpenPose picture (RGB uint8, `size` (w, h)) of a skeleton fitted without stretching."""
    fitted = fit_skeleton(body, frame, size)
    return draw_openpose(fitted, (size[1], size[0]))


def photo_skeleton(estimator: PoseEstimator, rgb: np.ndarray) -> tuple[Pose, tuple[float, float]]:
    """The body skeleton of the person in a photo (DWPose on the whole picture) and the photo's (w, h)."""
    height, width = rgb.shape[:2]
    body = openpose_body(estimator.estimate(rgb, (0.0, 0.0, float(width), float(height))))
    return body, (float(width), float(height))


def has_pose(body: Pose) -> bool:
    """Whether enough of the body was found to hold a pose."""
    return int(body.confident().sum()) >= MIN_POINTS
