"""Safe decoding of untrusted image bytes (facechain_core/images.py)."""
from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from facechain_core.errors import UserFacingError
from facechain_core.images import decode_image, downscale, encode_jpeg, to_rgb

LIMITS = {"max_bytes": 5_000_000, "max_pixels": 4_000_000}
RED, BLUE = (255, 0, 0), (0, 0, 255)


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def decode(data: bytes, **limits) -> Image.Image:
    return decode_image(data, **{**LIMITS, **limits})


def error_code(data: bytes, **limits) -> str:
    with pytest.raises(UserFacingError) as info:
        decode(data, **limits)
    return info.value.code


def png_with_header_size(width: int, height: int) -> bytes:
    """Build a valid-looking PNG whose IHDR claims the given size but holds one row of data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00" * 3 * min(width, 1024))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def two_halves(size=(40, 20)) -> Image.Image:
    """An image red on its left half and blue on its right half."""
    img = Image.new("RGB", size, BLUE)
    img.paste(Image.new("RGB", (size[0] // 2, size[1]), RED), (0, 0))
    return img


def assert_close(pixel, expected, tolerance=12):
    assert all(abs(a - b) <= tolerance for a, b in zip(pixel, expected)), (pixel, expected)


@pytest.mark.parametrize("data", [b"", b"hello, not a picture", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj"])
def test_non_image_bytes_are_not_images(data):
    assert error_code(data) == "image.not_image"


def test_unlisted_format_is_not_an_image():
    # Pillow can read PCX, but a selfie upload has no business being one.
    assert error_code(encode(Image.new("RGB", (8, 8)), "PCX")) == "image.not_image"


def test_file_over_the_byte_limit_is_too_large():
    data = encode(two_halves(), "PNG")
    with pytest.raises(UserFacingError) as info:
        decode(data, max_bytes=len(data) - 1)
    assert info.value.code == "image.too_large"
    assert decode(data, max_bytes=len(data)).size == (40, 20)


def test_truncated_jpeg_is_corrupt():
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG", quality=90)
    assert error_code(data[: len(data) // 2]) == "image.corrupt"


def test_png_with_damaged_pixel_data_is_corrupt():
    data = bytearray(encode(Image.linear_gradient("L").resize((64, 64)), "PNG"))
    data[data.find(b"IDAT") + 10] ^= 0xFF
    assert error_code(bytes(data)) == "image.corrupt"


@pytest.mark.parametrize("size", [(100_000, 100_000), (3000, 3000)])
def test_header_claiming_too_many_pixels_is_refused_before_decoding(size):
    # 100k x 100k trips Pillow's own bomb guard on open; 3000 x 3000 only ours.
    data = png_with_header_size(*size)
    start = time.perf_counter()
    with pytest.raises(UserFacingError) as info:
        decode(data)
    assert info.value.code == "image.too_many_pixels"
    assert info.value.details["max_megapixels"] == "4.0"
    assert time.perf_counter() - start < 1.0


def test_real_image_over_the_pixel_limit_is_refused():
    data = encode(two_halves((200, 100)), "PNG")
    with pytest.raises(UserFacingError) as info:
        decode(data, max_pixels=19_999)
    assert info.value.code == "image.too_many_pixels"
    assert info.value.details["megapixels"] == "0.0"
    assert decode(data, max_pixels=20_000).size == (200, 100)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animations_are_refused(fmt):
    frames = [Image.new("RGB", (32, 32), c) for c in (RED, BLUE, (0, 255, 0))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert error_code(data) == "image.animated"


def test_single_frame_gif_is_a_still_photo():
    img = decode(encode(two_halves(), "GIF"))
    assert img.mode == "RGB"
    assert_close(img.getpixel((2, 2)), RED)


def test_multi_picture_jpeg_from_a_phone_is_a_still_photo():
    # Phones write MPO: a main JPEG with previews that Pillow counts as frames.
    data = encode(two_halves(), "MPO", save_all=True, append_images=[Image.new("RGB", (40, 20), BLUE)])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    img = decode(data)
    assert img.size == (40, 20)
    assert_close(img.getpixel((2, 10)), RED)


@pytest.mark.parametrize("orientation, size, red_at, blue_at", [
    (1, (40, 20), (2, 10), (37, 10)),
    (3, (40, 20), (37, 10), (2, 10)),
    (6, (20, 40), (10, 2), (10, 37)),  # rotate 90 clockwise: the left half goes on top
    (8, (20, 40), (10, 37), (10, 2)),
])
def test_exif_orientation_is_applied(orientation, size, red_at, blue_at):
    exif = Image.Exif()
    exif[0x0112] = orientation
    img = decode(encode(two_halves(), "JPEG", quality=95, exif=exif.tobytes()))
    assert img.size == size
    assert_close(img.getpixel(red_at), RED, tolerance=40)
    assert_close(img.getpixel(blue_at), BLUE, tolerance=40)


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (30, 10), (0, 0, 0, 0))
    rgba.paste(Image.new("RGBA", (10, 10), (255, 0, 0, 255)), (0, 0))
    rgba.paste(Image.new("RGBA", (10, 10), (0, 0, 0, 128)), (20, 0))
    img = decode(encode(rgba, "PNG"))
    assert img.mode == "RGB"
    assert_close(img.getpixel((5, 5)), RED, tolerance=0)
    assert_close(img.getpixel((15, 5)), (255, 255, 255), tolerance=0)
    assert_close(img.getpixel((25, 5)), (127, 127, 127), tolerance=1)


def test_palette_with_transparency_is_composited_on_white():
    p = Image.new("P", (20, 10), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.paste(1, (0, 0, 10, 10))
    img = decode(encode(p, "GIF", transparency=0))
    assert_close(img.getpixel((5, 5)), RED, tolerance=0)
    assert_close(img.getpixel((15, 5)), (255, 255, 255), tolerance=0)


@pytest.mark.parametrize("mode", ["L", "LA", "1"])
def test_greyscale_becomes_grey_rgb(mode):
    grey = Image.linear_gradient("L").resize((64, 16)).convert(mode)
    img = decode(encode(grey, "PNG"))
    arr = np.asarray(img)
    assert img.mode == "RGB" and img.size == (64, 16)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert arr.min() < 20 and arr.max() > 235


def test_cmyk_jpeg_keeps_its_colours():
    cmyk = Image.new("CMYK", (32, 16), (255, 0, 0, 0))  # cyan
    cmyk.paste(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), (16, 0))  # red
    img = decode(encode(cmyk, "JPEG", quality=95))
    assert img.mode == "RGB"
    assert_close(img.getpixel((4, 8)), (0, 255, 255))
    assert_close(img.getpixel((28, 8)), RED)


def test_16_bit_greyscale_png_keeps_its_contrast():
    values = np.tile(np.linspace(1000, 64000, 64).astype(np.uint16), (8, 1))
    source = Image.fromarray(values)
    assert source.mode == "I;16"
    img = decode(encode(source, "PNG"))
    row = np.asarray(img)[4, :, 0].astype(int)
    assert img.mode == "RGB"
    # Scaled by 255/65535: neither clipped to white nor collapsed.
    assert abs(row[0] - 4) <= 1 and abs(row[-1] - 249) <= 1
    assert (np.diff(row) >= 0).all()


@pytest.mark.parametrize("mode, values, expected", [
    ("F", [0.0, 0.5, 1.0], [0, 128, 255]),
    ("I", [0, 32896, 65535], [0, 128, 255]),
    ("I", [-100, 0, 100_000], [0, 0, 255]),  # outside 16 bits: stretched to the data's range
])
def test_wide_modes_are_scaled_not_clipped(mode, values, expected):
    array = np.array([values], dtype=np.float32 if mode == "F" else np.int32)
    img = to_rgb(Image.fromarray(array, mode=mode))
    got = [p[0] for p in np.asarray(img)[0]]
    assert img.mode == "RGB"
    assert all(abs(g - e) <= 1 for g, e in zip(got, expected)), got


def test_encode_jpeg_round_trips_and_drops_metadata():
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "PhoneMaker"
    upright = decode(encode(two_halves(), "JPEG", exif=exif.tobytes()))
    data = encode_jpeg(upright, quality=90)
    again = Image.open(io.BytesIO(data))
    assert data[:2] == b"\xff\xd8" and again.format == "JPEG"
    assert again.size == (20, 40)
    assert len(again.getexif()) == 0
    with pytest.raises(ValueError, match="quality"):
        encode_jpeg(upright, quality=0)


def test_downscale_keeps_aspect_and_never_enlarges():
    img = two_halves((1000, 500))
    small = downscale(img, 400)
    assert small.size == (400, 200)
    assert_close(small.getpixel((10, 100)), RED, tolerance=2)
    assert downscale(img, 1000) is img
    assert downscale(img, 4000) is img
    with pytest.raises(ValueError, match="max_side"):
        downscale(img, 0)
