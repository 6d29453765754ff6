"""Safe image decoding: bytes from a user in, one upright 8-bit RGB picture out.

Every function here is pure (no I/O, no shared state), so the bot may run them in a thread.
Only still photos in common formats are accepted; the pixel count is checked from the header
before any pixel is decoded, so a small file claiming huge dimensions costs nothing.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from facechain_core.errors import UserFacingError

logger = logging.getLogger(__name__)

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Many phone JPEGs open as MPO (a main picture plus previews): still photos despite their frames.
_STILL_MULTI_FRAME = {"MPO"}
_WHITE = (255, 255, 255)
# Errors Pillow raises from a damaged stream while decoding pixels.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError)


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode untrusted bytes into an EXIF-upright RGB image or raise a UserFacingError."""
    if len(data) > max_bytes:
        raise UserFacingError("image.too_large", size_mb=_millions(len(data)), max_mb=_millions(max_bytes))
    img = _open(data, max_pixels)
    width, height = img.size
    if width * height > max_pixels:
        raise _too_many_pixels(max_pixels, width * height)
    try:
        # Asking a GIF whether it is animated reads on past the first frame: inside the guard.
        if getattr(img, "is_animated", False) and img.format not in _STILL_MULTI_FRAME:
            raise UserFacingError("image.animated")
        img.load()
        upright = _exif_upright(img)
        return to_rgb(upright)
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(max_pixels, width * height) from exc
    except _DECODE_ERRORS as exc:
        logger.info("corrupt %s image (%dx%d): %s", img.format, width, height, exc)
        raise UserFacingError("image.corrupt") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing transparency on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img)), mode="L").convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "1":
        return img.convert("L").convert("RGB")
    # L, P, CMYK, YCbCr and friends: Pillow's converters are exact enough for face work.
    return img.convert("RGB")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale high-bit-depth grey values to 0..255 keeping their contrast (never clip)."""
    values = values.astype(np.float64)
    if values.size == 0:
        return values.astype(np.uint8)
    top = float(values.max())
    if values.dtype.kind == "f" and top <= 1.0 and float(values.min()) >= 0.0:
        scale = 255.0  # float images in 0..1
    elif top <= 65535 and float(values.min()) >= 0:
        scale = 255.0 / 65535.0  # a 16-bit container, as PNG and TIFF store them
    else:
        low = float(values.min())
        values = values - low
        scale = 255.0 / max(top - low, 1e-12)
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def encode_jpeg(img: Image.Image, quality: int = 95) -> bytes:
    """Encode an image as baseline JPEG bytes without metadata (no EXIF, no GPS)."""
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be within 1..100, got {quality}")
    buf = io.BytesIO()
    to_rgb(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def downscale(img: Image.Image, max_side: int) -> Image.Image:
    """Return the image shrunk so its long side is at most max_side (never enlarged)."""
    if max_side <= 0:
        raise ValueError(f"max_side must be positive, got {max_side}")
    width, height = img.size
    long_side = max(width, height)
    if long_side <= max_side:
        return img
    factor = max_side / long_side
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def picture_size(path: str | Path) -> list[int] | None:
    """A picture file's [width, height] as stored, read from its header; None when it is not a readable picture."""
    try:
        with Image.open(path) as img:
            return [int(img.width), int(img.height)]
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise UserFacingError("image.not_image")
    # An explicit format list skips Pillow's lazy loading of the WebP and TIFF plugins.
    Image.init()
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        # Pillow refuses absurd header dimensions on open, before our own limit is asked.
        raise _too_many_pixels(max_pixels, None) from exc
    except UnidentifiedImageError as exc:
        raise UserFacingError("image.not_image") from exc
    except _DECODE_ERRORS as exc:
        raise UserFacingError("image.corrupt") from exc


def _exif_upright(img: Image.Image) -> Image.Image:
    try:
        upright = ImageOps.exif_transpose(img)
    except (KeyError, ValueError, TypeError, SyntaxError) as exc:
        # Broken metadata must not cost the user a good photo; the pixels are intact.
        logger.warning("ignoring unreadable EXIF orientation: %s", exc)
        return img
    return upright if upright is not None else img


def _too_many_pixels(max_pixels: int, pixels: int | None) -> UserFacingError:
    found = _millions(pixels) if pixels is not None else "?"
    return UserFacingError("image.too_many_pixels", megapixels=found, max_megapixels=_millions(max_pixels))


def _millions(n: int) -> str:
    return f"{n / 1_000_000:.1f}"
