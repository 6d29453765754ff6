"""Cartoon portraits (FaceChain V2's DCT-Net feature) with ONNX image-to-image stylisers.

Styles are data (``cartoon_styles.toml``): each names a *scene* model for the whole picture and a
*face* model for aligned face crops, both AnimeGAN-family exports run with onnxruntime. Each model
is described by its input layout (NCHW/NHWC), value range and size rule (a multiple, or a fixed
input side); ``Styliser`` converts to and from that, padding by reflection and cropping back (a
fixed-size export runs over overlapping tiles), so any photo size works and the result has the
photo's size.

One job, as DCT-Net does it:

1. decode the photo upright; one longer than ``max_side`` is downscaled first (the result says so);
2. find faces (YuNet, when installed) and stylise the whole picture with the scene model;
3. for each of the largest faces: align it (eyes level), crop it at the face model's preferred size
   with a margin for hair and chin, stylise it and blend it back through a feathered mask;
4. pass safe mode (``facechain_core.safety``), then write the picture (JPEG, quality 95, no metadata but
   the AI-generated label; PNG when the output path asks for it).

Styles of kind "diffusion" (3D, hand-drawn) repaint the photo instead, keeping the main face's
identity through IP-Adapter FaceID on the portrait feature's models (``cartoon_diffusion.py``).

Pipeline settings (``PipelineContext.settings``): ``cartoon_max_side`` (1536), ``cartoon_max_faces``
(4), ``cartoon_max_pixels`` (60_000_000), ``cartoon_max_bytes`` (50_000_000), ``cartoon_faces`` (True:
face-aware), ``cartoon_threads`` (0: onnxruntime's default). Job params: ``image`` (a path), ``style``
(an id), and ``out`` (a file path) or ``out_dir``.
"""
from __future__ import annotations

import logging
import math
import re
import secrets
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from facechain_core import safety
from facechain_core.cartoon_diffusion import DiffusionSpec, DiffusionStyler
from facechain_core.errors import ModelNotInstalled, UserFacingError
from facechain_core.faces import Face, FaceDetector
from facechain_core.images import decode_image, downscale
from facechain_core.pipeline import JobResult, PipelineContext, Progress
from facechain_core.sessions import open_session

log = logging.getLogger(__name__)

FEATURE = "cartoon"
DEFAULT_STYLES = Path(__file__).with_name("cartoon_styles.toml")
LAYOUTS = ("nchw", "nhwc")
DEFAULTS: dict[str, Any] = {
    "cartoon_max_side": 1536,
    "cartoon_max_faces": 4,
    "cartoon_max_pixels": 60_000_000,
    "cartoon_max_bytes": 50_000_000,
    "cartoon_faces": True,
    "cartoon_threads": 0,
}
MIN_FACE_PX = 24  # smaller faces are left to the scene model
DETECT_MAX_SIDE = 1280
JPEG_QUALITY = 95
TILE_OVERLAP = 64  # pixels two tiles of a fixed-size model share, blended linearly
_ID_RE = re.compile(r"[a-z][a-z0-9-]{0,19}")
_DIFFUSION_OPTIONAL = ("negative_prompt", "strength", "steps", "guidance", "identity_weight", "size")


class CartoonDataError(ValueError):
    """cartoon_styles.toml is malformed; the message names the table and the key."""


@dataclass(frozen=True)
class ModelSpec:
    """How one image-to-image export is fed: layout, value range and size rule."""

    name: str  # the manifest name of its weights
    layout: str  # "nchw" or "nhwc"
    value_range: tuple[float, float]
    multiple: int = 1  # height and width must be multiples of this
    size: int | None = None  # fixed square input side of the export

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise CartoonDataError(f"model {self.name!r}: layout must be one of {LAYOUTS}, got {self.layout!r}")
        low, high = self.value_range
        if not high > low:
            raise CartoonDataError(f"model {self.name!r}: value_range must rise, got {list(self.value_range)}")
        if self.multiple < 1:
            raise CartoonDataError(f"model {self.name!r}: multiple must be at least 1, got {self.multiple}")
        if self.size is not None and (self.size < 1 or self.size % self.multiple):
            raise CartoonDataError(f"model {self.name!r}: size must be a positive multiple of {self.multiple}, "
                                   f"got {self.size}")


@dataclass(frozen=True)
class CartoonStyle:
    """A style users pick: ONNX scene and face models (kind "onnx"), or a diffusion repaint."""

    id: str
    names: dict[str, str]
    features: tuple[str, ...]
    face_model: str = ""
    scene_model: str = ""
    face_size: int = 512
    face_margin: float = 2.0
    kind: str = "onnx"  # or "diffusion"
    diffusion: DiffusionSpec | None = None

    def display_name(self, lang: str | None = None) -> str:
        return self.names.get(lang or "en") or self.names.get("en") or self.id


@dataclass(frozen=True)
class CartoonBook:
    """Every model spec and style of the styles file, styles in file order."""

    models: dict[str, ModelSpec]
    styles: dict[str, CartoonStyle]

    def get(self, style_id: str) -> CartoonStyle | None:
        return self.styles.get(style_id)

    def available(self, features: Iterable[str]) -> list[CartoonStyle]:
        """Returns the styles whose features are all installed, in file order."""
        have = set(features)
        return [s for s in self.styles.values() if have.issuperset(s.features)]

    def find(self, text: str, styles: Iterable[CartoonStyle] | None = None) -> CartoonStyle | None:
        """Returns the style named `text` by id or display name in any language (case-insensitive)."""
        wanted = " ".join(text.split()).casefold()
        for style in self.styles.values() if styles is None else styles:
            if wanted == style.id or wanted in (n.casefold() for n in style.names.values()):
                return style
        return None


# -- the styles file -----------------------------------------------------------------------------
def parse_cartoon_styles(data: dict[str, Any], label: str = "cartoon styles") -> CartoonBook:
    """Validates parsed TOML data and returns the book."""
    unknown = set(data) - {"model", "style"}
    if unknown:
        raise CartoonDataError(f"{label}: unknown top-level keys {sorted(unknown)}")
    models = {name: _parse_model(name, raw, label) for name, raw in _tables(data, "model", label).items()}
    styles = {sid: _parse_style(sid, raw, models, label) for sid, raw in _tables(data, "style", label).items()}
    if not styles:
        raise CartoonDataError(f"{label}: no [style.<id>] tables")
    return CartoonBook(models=models, styles=styles)


@cache
def load_cartoon_styles(path: Path | None = None) -> CartoonBook:
    """Loads and validates the styles file (the packaged ``cartoon_styles.toml`` by default)."""
    path = Path(path) if path is not None else DEFAULT_STYLES
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise CartoonDataError(f"{path}: not valid TOML: {exc}") from None
    return parse_cartoon_styles(data, str(path))


def _tables(data: dict[str, Any], key: str, label: str) -> dict[str, dict[str, Any]]:
    tables = data.get(key, {})
    if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
        raise CartoonDataError(f"{label}: '{key}' must hold [{key}.<name>] tables")
    return tables


def _check_keys(where: str, raw: dict[str, Any], required: set[str], optional: set[str]) -> None:
    missing, unknown = required - set(raw), set(raw) - required - optional
    if missing:
        raise CartoonDataError(f"{where}: missing {sorted(missing)}")
    if unknown:
        raise CartoonDataError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(required | optional)})")


def _parse_model(name: str, raw: dict[str, Any], label: str) -> ModelSpec:
    where = f"{label}: [model.{name}]"
    _check_keys(where, raw, {"layout", "value_range"}, {"multiple", "size"})
    value_range = raw["value_range"]
    if not (isinstance(value_range, list) and len(value_range) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value_range)):
        raise CartoonDataError(f"{where}: value_range must be [low, high], got {value_range!r}")
    for key in ("multiple", "size"):
        if key in raw and (not isinstance(raw[key], int) or isinstance(raw[key], bool)):
            raise CartoonDataError(f"{where}: {key} must be an integer, got {raw[key]!r}")
    try:
        return ModelSpec(name=name, layout=str(raw["layout"]).lower(),
                         value_range=(float(value_range[0]), float(value_range[1])),
                         multiple=int(raw.get("multiple", 1)), size=raw.get("size"))
    except CartoonDataError as exc:
        raise CartoonDataError(f"{label}: {exc}") from None


def _parse_style(sid: str, raw: dict[str, Any], models: dict[str, ModelSpec], label: str) -> CartoonStyle:
    where = f"{label}: [style.{sid}]"
    if not _ID_RE.fullmatch(sid):
        raise CartoonDataError(f"{where}: ids are lowercase letters, digits and '-', starting with a letter")
    kind = raw.get("kind", "onnx")
    if kind == "diffusion":
        _check_keys(where, raw, {"en", "features", "kind", "prompt"}, {"zh", *_DIFFUSION_OPTIONAL})
    elif kind == "onnx":
        _check_keys(where, raw, {"en", "features", "face_model", "scene_model"},
                    {"zh", "kind", "face_size", "face_margin"})
    else:
        raise CartoonDataError(f"{where}: kind must be 'onnx' or 'diffusion', got {kind!r}")
    features = raw["features"]
    if not isinstance(features, list) or not features or not all(isinstance(f, str) and f for f in features):
        raise CartoonDataError(f"{where}: features must be a non-empty list of feature names")
    names = {lang: str(raw[lang]) for lang in ("en", "zh") if raw.get(lang)}
    if kind == "diffusion":
        if "portrait" not in features:
            raise CartoonDataError(f"{where}: a diffusion style runs on the portrait models: list 'portrait'")
        try:
            spec = DiffusionSpec(**{key: raw[key] for key in ("prompt", *_DIFFUSION_OPTIONAL) if key in raw})
        except (TypeError, ValueError) as exc:
            raise CartoonDataError(f"{where}: {exc}") from None
        return CartoonStyle(id=sid, names=names, features=tuple(features), kind=kind, diffusion=spec)
    for key in ("face_model", "scene_model"):
        if raw[key] not in models:
            raise CartoonDataError(f"{where}: {key} {raw[key]!r} has no [model.{raw[key]}] table")
    face_size = raw.get("face_size", 512)
    face_model = models[raw["face_model"]]
    if not isinstance(face_size, int) or face_size < 32 or face_size % face_model.multiple:
        raise CartoonDataError(f"{where}: face_size must be an integer >= 32 and a multiple of "
                               f"{face_model.multiple}, got {face_size!r}")
    margin = float(raw.get("face_margin", 2.0))
    if not 1.0 <= margin <= 4.0:
        raise CartoonDataError(f"{where}: face_margin must be within 1..4, got {margin}")
    return CartoonStyle(id=sid, names=names, features=tuple(features), face_model=raw["face_model"],
                        scene_model=raw["scene_model"], face_size=face_size, face_margin=margin)


# -- layout, range and size handling (pure) ------------------------------------------------------
def to_model_input(rgb: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Turns an RGB uint8 (H, W, 3) array into the model's batch of one, in its layout and range."""
    low, high = spec.value_range
    x = rgb.astype(np.float32) * np.float32((high - low) / 255.0) + np.float32(low)
    x = x[None]
    if spec.layout == "nchw":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def from_model_output(y: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Turns a model output (batch of one, its layout and range) back into RGB uint8 (H, W, 3)."""
    if y.ndim != 4 or y.shape[0] != 1:
        raise ValueError(f"model {spec.name!r}: expected an output of shape (1, ...), got {y.shape}")
    image = y[0].transpose(1, 2, 0) if spec.layout == "nchw" else y[0]
    if image.shape[2] != 3:
        raise ValueError(f"model {spec.name!r}: output has {image.shape[2]} channels, expected 3 "
                         f"(is the layout {spec.layout!r} right?)")
    low, high = spec.value_range
    scaled = (image.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def pad_to(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pads the bottom and right edges to (height, width) by mirroring the picture."""
    h, w = rgb.shape[:2]
    if height < h or width < w:
        raise ValueError(f"cannot pad {w}x{h} down to {width}x{height}")
    if (height, width) == (h, w):
        return rgb
    return np.pad(rgb, ((0, height - h), (0, width - w), (0, 0)), mode="symmetric")


def padded_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """The smallest (height, width) at least as big that are multiples of `multiple`."""
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


class Styliser:
    """One image-to-image ONNX model behind its layout, value range and size rule."""

    def __init__(self, session: Any, spec: ModelSpec) -> None:
        self.spec = spec
        self._session = session
        model_input = session.get_inputs()[0]
        self._input_name = model_input.name
        self._output_name = session.get_outputs()[0].name
        self.fixed_side = _check_input_shape(spec, list(model_input.shape))

    @classmethod
    def open(cls, path: Path, spec: ModelSpec, device: str = "cpu", threads: int = 0) -> Styliser:
        """Opens the ONNX file at `path` with onnxruntime on `device` (see ``facechain_core.sessions``)."""
        return cls(open_session(path, device, threads), spec)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """Stylises an RGB uint8 (H, W, 3) picture of any size; returns one of the same size."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
            raise ValueError(f"expected a non-empty RGB uint8 array (H, W, 3), got {rgb.dtype} {rgb.shape}")
        h, w = rgb.shape[:2]
        if self.fixed_side is not None:
            side = self.fixed_side
            padded = pad_to(rgb, max(h, side), max(w, side))
            return self._run_tiled(padded, side)[:h, :w]
        padded = pad_to(rgb, *padded_size(h, w, self.spec.multiple))
        return self._run(padded)[:h, :w]

    def _run(self, rgb: np.ndarray) -> np.ndarray:
        out = self._session.run([self._output_name], {self._input_name: to_model_input(rgb, self.spec)})[0]
        result = from_model_output(out, self.spec)
        if result.shape != rgb.shape:
            raise ValueError(f"model {self.spec.name!r}: output {result.shape[:2]} differs from input {rgb.shape[:2]}")
        return result

    def _run_tiled(self, rgb: np.ndarray, side: int) -> np.ndarray:
        """Runs a fixed-size model over overlapping tiles, blending the overlaps linearly."""
        h, w = rgb.shape[:2]
        if (h, w) == (side, side):
            return self._run(rgb)
        overlap = min(TILE_OVERLAP, side // 4)
        ramp = np.minimum(np.arange(side) + 1, np.arange(side)[::-1] + 1).astype(np.float32)
        weight_1d = np.clip(ramp / max(overlap, 1), 1e-3, 1.0)
        weight = np.outer(weight_1d, weight_1d)[..., None]
        total = np.zeros((h, w, 3), np.float32)
        norm = np.zeros((h, w, 1), np.float32)
        for top in _tile_starts(h, side, overlap):
            for left in _tile_starts(w, side, overlap):
                tile = self._run(np.ascontiguousarray(rgb[top:top + side, left:left + side]))
                total[top:top + side, left:left + side] += tile.astype(np.float32) * weight
                norm[top:top + side, left:left + side] += weight
        return np.clip(np.rint(total / norm), 0, 255).astype(np.uint8)


def _tile_starts(length: int, side: int, overlap: int) -> list[int]:
    if length <= side:
        return [0]
    step = side - overlap
    starts = list(range(0, length - side, step))
    return starts + [length - side]


def _check_input_shape(spec: ModelSpec, shape: list[Any]) -> int | None:
    """Checks the export's input shape against the spec; returns its fixed square side, if any."""
    if len(shape) != 4:
        raise ValueError(f"model {spec.name!r}: expected a 4-D image input, got shape {shape}")
    channels = shape[1] if spec.layout == "nchw" else shape[3]
    spatial = shape[2:4] if spec.layout == "nchw" else shape[1:3]
    if isinstance(channels, int) and channels != 3:
        other = "nhwc" if spec.layout == "nchw" else "nchw"
        raise ValueError(f"model {spec.name!r}: declared {spec.layout} but its input shape {shape} has "
                         f"{channels} channels there; is it {other}?")
    fixed = [d for d in spatial if isinstance(d, int) and d > 0]
    if not fixed:
        if spec.size is not None:
            log.info("model %s takes any size; its declared size %d is used for face crops only", spec.name, spec.size)
        return None
    if len(fixed) != 2 or fixed[0] != fixed[1]:
        raise ValueError(f"model {spec.name!r}: only square fixed inputs are supported, got shape {shape}")
    if spec.size is not None and fixed[0] != spec.size:
        raise ValueError(f"model {spec.name!r}: declared size {spec.size} but the export takes {fixed[0]}")
    if fixed[0] % spec.multiple:
        raise ValueError(f"model {spec.name!r}: its fixed input {fixed[0]} is not a multiple of {spec.multiple}")
    return fixed[0]


# -- faces ---------------------------------------------------------------------------------------
def face_transform(face: Face, size: int, margin: float) -> np.ndarray:
    """The 2x3 affine map from the picture to a `size` square crop of the face, eyes level."""
    (lx, ly), (rx, ry) = face.landmarks[0], face.landmarks[1]
    angle = math.degrees(math.atan2(ry - ly, rx - lx))
    x, y, w, h = face.box
    # Centred a little above the box centre so the crop keeps the hair, as portrait crops do.
    cx, cy = x + w / 2.0, y + h / 2.0 - 0.1 * h
    side = margin * max(w, h)
    matrix = cv2.getRotationMatrix2D((cx, cy), angle, size / side)
    matrix[:, 2] += (size / 2.0 - cx, size / 2.0 - cy)
    return matrix


def feather_mask(size: int) -> np.ndarray:
    """A (size, size) float mask: 1 inside, falling smoothly to 0 over the outer eighth of each edge."""
    ramp = max(2, size // 8)
    edge = np.minimum(np.arange(size), np.arange(size)[::-1]).astype(np.float32)
    t = np.clip(edge / ramp, 0.0, 1.0)
    t = t * t * (3.0 - 2.0 * t)  # smoothstep: no visible seam where the ramp starts
    return np.outer(t, t)


def blend_face(canvas: np.ndarray, styled_crop: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Warps a stylised face crop back into the picture and blends it in through the feathered mask."""
    h, w = canvas.shape[:2]
    size = styled_crop.shape[0]
    # Only the crop's footprint in the picture changes: warp and blend that rectangle alone.
    inverse = cv2.invertAffineTransform(matrix)
    corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64) @ inverse[:, :2].T + inverse[:, 2]
    x0, y0 = (max(0, math.floor(v)) for v in corners.min(axis=0))
    x1, y1 = min(w, math.ceil(corners[:, 0].max()) + 1), min(h, math.ceil(corners[:, 1].max()) + 1)
    if x1 <= x0 or y1 <= y0:
        return canvas
    shifted = matrix.copy()
    shifted[:, 2] += matrix[:, :2] @ np.array([x0, y0], np.float64)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    roi = (x1 - x0, y1 - y0)
    back = cv2.warpAffine(styled_crop, shifted, roi, flags=flags, borderMode=cv2.BORDER_CONSTANT)
    mask = cv2.warpAffine(feather_mask(size), shifted, roi, flags=flags, borderMode=cv2.BORDER_CONSTANT)[..., None]
    region = canvas[y0:y1, x0:x1].astype(np.float32)
    out = canvas.copy()
    out[y0:y1, x0:x1] = np.clip(np.rint(region * (1.0 - mask) + back.astype(np.float32) * mask), 0, 255)
    return out


def cartoonise(rgb: np.ndarray, scene: Callable[[np.ndarray], np.ndarray], face: Callable[[np.ndarray], np.ndarray],
               faces: list[Face], face_size: int, face_margin: float,
               on_step: Callable[[int], None] | None = None) -> np.ndarray:
    """Stylises the picture with `scene`, then each face crop with `face`, blended back (DCT-Net style).

    ``on_step(k)`` follows each stylisation: k is 1 after the scene, 1 + i after the i-th face.
    """
    canvas = scene(rgb)
    if on_step is not None:
        on_step(1)
    for index, found in enumerate(faces):
        matrix = face_transform(found, face_size, face_margin)
        crop = cv2.warpAffine(rgb, matrix, (face_size, face_size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REFLECT_101)
        canvas = blend_face(canvas, face(crop), matrix)
        if on_step is not None:
            on_step(index + 2)
    return canvas


def pick_faces(faces: list[Face], max_faces: int, min_px: int = MIN_FACE_PX) -> list[Face]:
    """The largest faces big enough to be worth a crop of their own."""
    big = [f for f in faces if min(f.box[2], f.box[3]) >= min_px and len(f.landmarks) >= 2]
    return sorted(big, key=lambda f: f.area, reverse=True)[:max(0, max_faces)]


# -- the pipeline --------------------------------------------------------------------------------
@dataclass
class _Loaded:
    context: PipelineContext
    settings: dict[str, Any]
    book: CartoonBook
    detector: FaceDetector | None
    stylisers: dict[str, Styliser] = field(default_factory=dict)
    diffusion: DiffusionStyler | None = None


class CartoonPipeline:
    """Job "cartoon": a photo and a style id -> one stylised picture (see the module docstring)."""

    kind = "cartoon"

    def __init__(self, detector_factory: Callable[[Path], FaceDetector] | None = None,
                 styles_path: Path | None = None) -> None:
        self._detector_factory = detector_factory
        self._styles_path = styles_path
        self._loaded: _Loaded | None = None

    def load(self, context: PipelineContext) -> None:
        """Reads the style data and opens the face detector; stylisers open on first use."""
        settings = {**DEFAULTS, **context.settings}
        book = load_cartoon_styles(self._styles_path)
        detector = self._open_detector(context) if settings["cartoon_faces"] else None
        self._loaded = _Loaded(context=context, settings=settings, book=book, detector=detector)

    def close(self) -> None:
        """Drops the onnxruntime sessions, the detector and the diffusion styler."""
        if self._loaded is not None and self._loaded.diffusion is not None:
            self._loaded.diffusion.close()
        self._loaded = None

    def styliser(self, name: str) -> Styliser:
        """The session of manifest model `name`, opened once (ModelNotInstalled when missing)."""
        loaded = self._require_loaded()
        styliser = loaded.stylisers.get(name)
        if styliser is None:
            path = loaded.context.model_path(name, _feature_of(name))
            threads = int(loaded.settings["cartoon_threads"])
            styliser = Styliser.open(path, loaded.book.models[name], loaded.context.device, threads)
            loaded.stylisers[name] = styliser
            log.info("opened cartoon model %s from %s", name, path)
        return styliser

    def run(self, params: dict[str, Any], progress: Progress) -> JobResult:
        """Stylises params["image"] in params["style"] and writes the result."""
        loaded = self._require_loaded()
        settings = loaded.settings
        # 1. The style, the photo (downscaled past the limit) and its faces.
        style = loaded.book.get(str(params.get("style", "")))
        if style is None:
            raise UserFacingError("cartoon.unknown_style_plain", style=params.get("style", ""),
                                  styles=", ".join(loaded.book.styles))
        # Missing weights are reported before any pixel work.
        onnx = None if style.diffusion else (self.styliser(style.scene_model), self.styliser(style.face_model))
        image = self._read(Path(params["image"]), settings)
        original = image.size
        max_side = int(settings["cartoon_max_side"])
        image = downscale(image, max_side)
        rgb = np.asarray(image)
        faces = self._faces(image, int(settings["cartoon_max_faces"]))
        # 2-3. ONNX: the scene, then each face crop blended over it. Diffusion: a repaint keeping the face.
        if style.diffusion is not None:
            if not faces:
                raise UserFacingError("cartoon.needs_face", style=style.display_name())
            seed = int(params["seed"]) if params.get("seed") is not None else secrets.randbelow(2**31)
            totals = [1]

            def denoised(done: int, steps: int) -> None:
                totals[0] = steps + 1  # the last step is writing the file
                progress(done, steps + 1)

            result = self._diffusion()(rgb, faces[0], style.diffusion, seed, on_step=denoised)
            total = totals[0]
        else:
            assert onnx is not None
            total = len(faces) + 3
            progress(1, total)
            result = cartoonise(rgb, *onnx, faces, style.face_size, style.face_margin,
                                on_step=lambda done: progress(1 + done, total))
        # 4. Safe mode, then the file, labelled as AI-generated.
        screened = safety.screen(loaded.context, params, [result], 1)
        out = Path(params["out"]) if params.get("out") else Path(params["out_dir"]) / f"cartoon_{style.id}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        _save(Image.fromarray(result), out, safety.service_name(loaded.context))
        progress(total, total)
        downscaled = list(original) if image.size != original else None
        log.info("cartoon style=%s size=%dx%d faces=%d downscaled_from=%s", style.id, image.width, image.height,
                 len(faces), downscaled)
        meta = {"style": style.id, "faces": len(faces), "size": [image.width, image.height],
                "downscaled_from": downscaled, "max_side": max_side, "safety": safety.safety_meta(screened)}
        return JobResult(files=[out], meta=meta)

    # -- steps -----------------------------------------------------------------------------------
    def _diffusion(self) -> DiffusionStyler:
        loaded = self._require_loaded()
        if loaded.diffusion is None:
            loaded.diffusion = DiffusionStyler(loaded.context)
        return loaded.diffusion

    def _require_loaded(self) -> _Loaded:
        if self._loaded is None:
            raise RuntimeError("CartoonPipeline used before load")
        return self._loaded

    @staticmethod
    def _read(path: Path, settings: dict[str, Any]) -> Image.Image:
        if not path.is_file():
            raise FileNotFoundError(f"cartoon input not found: {path}")
        return decode_image(path.read_bytes(), max_bytes=int(settings["cartoon_max_bytes"]),
                            max_pixels=int(settings["cartoon_max_pixels"]))

    def _faces(self, image: Image.Image, max_faces: int) -> list[Face]:
        detector = self._require_loaded().detector
        if detector is None or max_faces <= 0:
            return []
        from facechain_core.selfie import detect_faces

        return pick_faces(detect_faces(image, detector, DETECT_MAX_SIDE), max_faces)

    def _open_detector(self, context: PipelineContext) -> FaceDetector | None:
        """YuNet when installed; without it every picture is stylised whole (logged once)."""
        path = _yunet_path(context)
        if path is None:
            log.warning("cartoon: no face detector installed (`facechain-bot models pull selfie`); "
                        "faces are stylised with the rest of the picture")
            return None
        if self._detector_factory is not None:
            return self._detector_factory(path)
        from facechain_core.faces import create_detector

        return create_detector("yunet", path)


def _save(image: Image.Image, out: Path, service: str) -> None:
    if out.suffix.lower() == ".png":
        safety.save_labelled(image, out, service, compress_level=3)
    else:
        safety.save_labelled(image, out, service, image_format="JPEG", quality=JPEG_QUALITY)


def _yunet_path(context: PipelineContext) -> Path | None:
    # YuNet's manifest entry serves "selfie" (and portraits); "cartoon" is asked first in case it is added.
    for feature in (FEATURE, "selfie"):
        try:
            return context.model_path("yunet", feature)
        except ValueError:
            continue
        except ModelNotInstalled:
            return None
    return None


def _feature_of(model: str) -> str:
    """The manifest feature a model serves first: what its pull command names."""
    from facechain_core.manifest import load_manifest

    try:
        return load_manifest().get(model).features[0]
    except KeyError:
        return FEATURE

