"""Enhance / Upscale: face restoration, then x2 or x4 super-resolution, saved to fit the chat's upload limit.

1. Faces: every face the detector finds is aligned to the FFHQ template, restored by the GFPGAN-family ONNX
   (``facechain_core.restore``; CodeFormer where the operator chose it) and blended back through a feathered
   mask, so only the face region changes.
2. Super-resolution: a Real-ESRGAN-family ONNX (input [1, 3, H, W] RGB in [0, 1], output [1, 3, sH, sW]) run
   over overlapping tiles, so memory stays flat on large pictures; the model enlarges by its own layers, the
   scale is read from what it returns.
3. The file: PNG when it fits ``max_bytes`` (the platform's upload limit), else JPEG at quality 95, else the
   job is refused with both sizes. Either carries the AI-generated label in its metadata.

Settings (``PipelineContext.settings``): ``enhance_restorer`` ("gfpgan" or "codeformer"), ``enhance_tile``
(256 px), ``enhance_tile_pad`` (16 px), ``enhance_restore_weight`` (1.0), ``enhance_threads`` (0: onnxruntime's
own), ``auto_restore`` ("off", "on", "auto": on a GPU) for the portrait pipeline (``wants_auto_restore``).
"""
from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from facechain_core import safety
from facechain_core.errors import ModelNotInstalled, UserFacingError
from facechain_core.images import decode_image
from facechain_core.pipeline import JobResult, PipelineContext, Progress
from facechain_core.restore import FaceRestorer, alignment, restore_frames
from facechain_core.sessions import open_session, providers_for

log = logging.getLogger(__name__)

FEATURE = "enhance"
UPSCALERS = {2: "real-esrgan-x2-onnx", 4: "real-esrgan-x4-onnx"}  # scale -> manifest name
RESTORERS = {"gfpgan": ("gfpgan-1.4-onnx", "enhance-restore"), "codeformer": ("codeformer-onnx", "enhance-codeformer")}
RESTORE_MODES = ("off", "on", "auto")
JPEG_QUALITY = 95
MAX_INPUT_PIXELS = 4096 * 4096  # what a button's source may be (results are far smaller)
MAX_INPUT_BYTES = 64 * 2**20
DEFAULTS: dict[str, Any] = {"enhance_restorer": "gfpgan", "enhance_tile": 256, "enhance_tile_pad": 16,
                            "enhance_restore_weight": 1.0, "enhance_threads": 0, "auto_restore": "off"}
MASK_MARGIN = 0.1  # of the aligned square left out at each edge, then feathered over as much again


class Upscaler:
    """A Real-ESRGAN-family ONNX model: an RGB picture in, the picture `scale` times larger out."""

    def __init__(self, session: Any, tile: int = 256, pad: int = 16) -> None:
        (picture,) = session.get_inputs()
        shape = list(picture.shape)
        if len(shape) != 4 or shape[1] != 3:
            raise ValueError(f"not an upscaler's signature: input {picture.name} {shape}")
        self._session, self._input, self._output = session, picture.name, session.get_outputs()[0].name
        fixed = shape[2] if isinstance(shape[2], int) else None
        # A model with a fixed input side gets tiles of exactly that side (context included).
        self.pad = int(pad)
        self.tile = fixed - 2 * self.pad if fixed else int(tile)
        if self.tile <= 0:
            raise ValueError(f"tile must be larger than twice the pad {pad}, got {self.tile + 2 * self.pad}")
        probe = self._run(np.zeros((self.tile + 2 * self.pad,) * 2 + (3,), np.float32))
        self.scale = probe.shape[0] // (self.tile + 2 * self.pad)
        if self.scale < 1 or probe.shape[0] != self.scale * (self.tile + 2 * self.pad):
            raise ValueError(f"the upscaler's output {probe.shape} is no whole multiple of its input")

    @classmethod
    def open(cls, path: Path, device: str = "cpu", threads: int = 0, tile: int = 256, pad: int = 16) -> Upscaler:
        return cls(open_session(path, device, threads), tile, pad)

    def _run(self, rgb: np.ndarray) -> np.ndarray:
        tensor = np.ascontiguousarray(rgb.transpose(2, 0, 1)[None], np.float32)
        return self._session.run([self._output], {self._input: tensor})[0][0].transpose(1, 2, 0)

    def tiles(self, height: int, width: int) -> int:
        return -(-height // self.tile) * -(-width // self.tile)

    def __call__(self, rgb: np.ndarray, on_tile: Callable[[int, int], None] | None = None) -> np.ndarray:
        """The RGB uint8 picture enlarged `scale` times, tile by tile (each with `pad` px of context)."""
        height, width = rgb.shape[:2]
        tile, pad, scale = self.tile, self.pad, self.scale
        rows, cols = -(-height // tile), -(-width // tile)
        # Reflected context around the picture, and out to whole tiles (model inputs keep one size).
        padded = np.pad(rgb.astype(np.float32) / 255.0,
                        ((pad, pad + rows * tile - height), (pad, pad + cols * tile - width), (0, 0)), mode="reflect")
        out = np.empty((rows * tile * scale, cols * tile * scale, 3), np.float32)
        done, total = 0, rows * cols
        for row in range(rows):
            for col in range(cols):
                y, x = row * tile, col * tile
                enlarged = self._run(padded[y:y + tile + 2 * pad, x:x + tile + 2 * pad])
                out[y * scale:(y + tile) * scale, x * scale:(x + tile) * scale] = \
                    enlarged[pad * scale:(pad + tile) * scale, pad * scale:(pad + tile) * scale]
                done += 1
                if on_tile is not None:
                    on_tile(done, total)
        return np.clip(np.rint(out[:height * scale, :width * scale] * 255.0), 0, 255).astype(np.uint8)


def face_mask(side: int) -> np.ndarray:
    """A feathered square over the aligned face (float in [0, 1]): 1 inside, 0 near the square's edges."""
    margin = max(1, int(side * MASK_MARGIN))
    mask = np.zeros((side, side), np.float32)
    mask[margin:side - margin, margin:side - margin] = 1.0
    return cv2.GaussianBlur(mask, (0, 0), margin / 2)


def restore_faces(rgb: np.ndarray, faces: Sequence[Any], restorer: FaceRestorer, weight: float = 1.0) -> np.ndarray:
    """`rgb` with each face (five landmarks) restored and blended back; pixels away from faces are kept exactly."""
    out = rgb
    height, width = rgb.shape[:2]
    aligned_mask = face_mask(restorer.side)
    for face in faces:
        landmarks = np.array(face.landmarks[:5], np.float32)
        inverse = cv2.invertAffineTransform(alignment(landmarks, restorer.side))
        mask = cv2.warpAffine(aligned_mask, inverse, (width, height), flags=cv2.INTER_LINEAR)
        out = restore_frames([out], landmarks, restorer, mask, weight)[0]
    return out


def wants_auto_restore(mode: str, device: str) -> bool:
    """Whether every portrait is restored: "on", or "auto" where onnxruntime runs the restorer on a GPU."""
    if mode not in RESTORE_MODES:
        raise ValueError(f"auto_restore must be one of {', '.join(RESTORE_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    return providers_for(device)[0] != "CPUExecutionProvider"


def open_restorer(context: PipelineContext, settings: dict[str, Any]) -> FaceRestorer | None:
    """The operator's face restorer when installed (None otherwise: Enhance then only upscales)."""
    choice = str(settings.get("enhance_restorer", "gfpgan"))
    if choice not in RESTORERS:
        raise ValueError(f"enhance_restorer must be one of {', '.join(RESTORERS)}, got {choice!r}")
    name, feature = RESTORERS[choice]
    try:
        path = context.model_path(name, feature)
    except (ModelNotInstalled, KeyError):
        log.info("enhance: no face restorer (`facechain-bot models pull %s`)", feature)
        return None
    return FaceRestorer.open(path, context.device, int(settings.get("enhance_threads", 0)))


def encode_to_fit(image: Image.Image, max_bytes: int, service: str) -> tuple[bytes, str]:
    """The labelled PNG when it fits `max_bytes`, else the labelled JPEG at quality 95; ("", "") if neither fits."""
    for fmt, options in (("PNG", {"compress_level": 6}), ("JPEG", {"quality": JPEG_QUALITY})):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options, **safety.label_options(service))
        if buffer.tell() <= max_bytes:
            return buffer.getvalue(), fmt
        log.info("enhance: %s of %d bytes exceeds the limit of %d", fmt, buffer.tell(), max_bytes)
    return b"", ""


@dataclass
class _Loaded:
    context: PipelineContext
    settings: dict[str, Any]
    detector: Any
    restorer: FaceRestorer | None


class EnhancePipeline:
    """Job "enhance": one picture -> its faces restored, enlarged x2 or x4, as a file that fits the chat."""

    def __init__(self, detector_factory: Callable[[Path], Any] | None = None) -> None:
        self._detector_factory = detector_factory
        self._loaded: _Loaded | None = None
        self._upscalers: dict[int, Upscaler] = {}

    def load(self, context: PipelineContext) -> None:
        """Opens the face detector and restorer; upscalers open on first use of their scale."""
        settings = {**DEFAULTS, **context.settings}
        detector_path = context.model_path("yunet", FEATURE)
        if self._detector_factory is not None:
            detector = self._detector_factory(detector_path)
        else:
            from facechain_core.faces import create_detector

            detector = create_detector("yunet", detector_path)
        self._loaded = _Loaded(context, settings, detector, open_restorer(context, settings))

    def close(self) -> None:
        self._loaded = None
        self._upscalers.clear()

    def upscaler(self, scale: int) -> Upscaler:
        loaded = self._loaded
        if loaded is None:
            raise RuntimeError("EnhancePipeline used before load")
        if scale not in UPSCALERS:
            raise ValueError(f"scale must be one of {sorted(UPSCALERS)}, got {scale}")
        if scale not in self._upscalers:
            settings = loaded.settings
            path = loaded.context.model_path(UPSCALERS[scale], FEATURE)
            model = Upscaler.open(path, loaded.context.device, int(settings["enhance_threads"]),
                                  int(settings["enhance_tile"]), int(settings["enhance_tile_pad"]))
            if model.scale != scale:
                raise ValueError(f"{path} enlarges x{model.scale}; {UPSCALERS[scale]} must enlarge x{scale}")
            self._upscalers[scale] = model
        return self._upscalers[scale]

    def run(self, params: dict[str, Any], progress: Progress) -> JobResult:
        """Restores, enlarges and writes the picture; refuses when even the JPEG exceeds ``max_bytes``."""
        loaded = self._loaded
        if loaded is None:
            raise RuntimeError("EnhancePipeline.run before load")
        scale, max_bytes = int(params.get("scale", 2)), int(params["max_bytes"])
        upscaler = self.upscaler(scale)
        # 1. The picture.
        source = Path(params["image"])
        if not source.is_file():
            raise UserFacingError("enhance.source_gone")
        rgb = np.asarray(decode_image(source.read_bytes(), max_bytes=MAX_INPUT_BYTES, max_pixels=MAX_INPUT_PIXELS))
        total = upscaler.tiles(*rgb.shape[:2]) + 2
        progress(0, total, "enhance.step_faces")
        # 2. Faces restored.
        faces = loaded.detector.detect(rgb) if loaded.restorer is not None else []
        if faces:
            rgb = restore_faces(rgb, faces, loaded.restorer, float(loaded.settings["enhance_restore_weight"]))
        progress(1, total, "enhance.step_upscale")
        # 3. Enlarged tile by tile.
        big = upscaler(rgb, lambda done, _: progress(1 + done, total, "enhance.step_upscale"))
        # 4. The file that fits the chat.
        service = safety.service_name(loaded.context)
        data, fmt = encode_to_fit(Image.fromarray(big), max_bytes, service)
        if not data:
            raise UserFacingError("enhance.too_big", scale=scale, limit_mb=round(max_bytes / 2**20, 1))
        out = Path(params["out_dir"]) / f"enhanced_x{scale}.{'png' if fmt == 'PNG' else 'jpg'}"
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_name(out.name + ".part")
        part.write_bytes(data)
        part.replace(out)
        progress(total, total)
        log.info("enhance x%d: %dx%d -> %dx%d, %d faces restored, %s %d bytes", scale, rgb.shape[1], rgb.shape[0],
                 big.shape[1], big.shape[0], len(faces), fmt, len(data))
        return JobResult(files=[out.resolve()], meta={
            "scale": scale, "size": [big.shape[1], big.shape[0]], "format": fmt.lower(),
            "faces_restored": len(faces), "restorer": "none" if loaded.restorer is None else
            str(loaded.settings["enhance_restorer"]), "bytes": len(data)})
