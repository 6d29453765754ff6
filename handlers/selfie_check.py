"""The selfie check as a callable: bytes in, ``SelfieResult`` out (or ``UserFacingError``).

``Services.check_selfie`` is one of these; the CLI's ``check-selfie`` uses the same. The detector named
in ``settings.selfie`` loads on first use. Registers nothing and imports no feature.
"""
from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from facechain_core.errors import ModelNotInstalled
from facechain_core.faces import FaceDetector, create_detector
from facechain_core.selfie import SelfieResult, SelfieThresholds, check_selfie

MB = 1_000_000  # decimal, as facechain_core.images reports sizes


def build_selfie_checker(detector: FaceDetector, *, min_face_px: int, max_upload_mb: float,
                         max_pixels: int) -> Callable[[bytes], SelfieResult]:
    """The ``Services.check_selfie`` callable: bytes in, SelfieResult out or UserFacingError."""
    thresholds = SelfieThresholds(min_face_px=min_face_px)
    return functools.partial(check_selfie, detector=detector, thresholds=thresholds,
                             max_bytes=int(max_upload_mb * MB), max_pixels=max_pixels)


def lazy_selfie_checker(settings: Any) -> Callable[[bytes], SelfieResult]:
    """A checker whose detector (named in ``settings.selfie``, under models_dir) loads on first use."""
    lock = threading.Lock()
    loaded: list[Callable[[bytes], SelfieResult]] = []

    def check(data: bytes) -> SelfieResult:
        with lock:
            if not loaded:
                model = Path(settings.selfie.detector_model).expanduser()
                if not model.is_absolute():
                    model = Path(settings.models_dir) / model
                if not model.exists():
                    raise ModelNotInstalled(model.name, "selfie", "facechain-bot models pull selfie")
                loaded.append(build_selfie_checker(
                    create_detector(settings.selfie.detector, model), min_face_px=settings.selfie.min_face_px,
                    max_upload_mb=settings.limits.max_upload_mb, max_pixels=settings.limits.max_pixels))
        return loaded[0](data)

    return check
