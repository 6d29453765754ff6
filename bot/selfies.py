"""Builds the selfie checker the handlers call: one cached detector, limits from the config."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from bot.config import Settings
from facechain_core.errors import ModelNotInstalled
from facechain_core.faces import FaceDetector, create_detector
from facechain_core.selfie import SelfieResult, SelfieThresholds, check_selfie

log = logging.getLogger(__name__)

SelfieChecker = Callable[[bytes], SelfieResult]


def detector_path(settings: Settings) -> Path:
    path = Path(settings.selfie.detector_model).expanduser()
    return path if path.is_absolute() else settings.models_dir / path


def build_selfie_checker(settings: Settings) -> SelfieChecker:
    """Returns ``check(bytes) -> SelfieResult``; blocking, so callers run it in a thread."""
    thresholds = SelfieThresholds(min_face_px=settings.selfie.min_face_px)
    max_bytes = int(settings.limits.max_upload_mb * 1024 * 1024)
    lock = threading.Lock()
    detector: list[FaceDetector] = []

    def get_detector() -> FaceDetector:
        with lock:
            if not detector:
                path = detector_path(settings)
                if not path.exists():
                    command = "facechain-bot models pull selfie"
                    log.error("face detector missing at %s: run `%s`", path, command)
                    raise ModelNotInstalled(path.name, "selfie", command)
                detector.append(create_detector(settings.selfie.detector, path))
            return detector[0]

    def check(data: bytes) -> SelfieResult:
        return check_selfie(data, get_detector(), thresholds, max_bytes=max_bytes, max_pixels=settings.limits.max_pixels)

    return check
