"""Hostile and unusual images, hand-built containers and /metrics scraping (robustness tests)."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np
from PIL import Image

BOUNDARY = "robustBoundary7"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def blocks(seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Image.Image:
    """Random 4x4 colour blocks scaled up (16 colours: a GIF palette holds them exactly)."""
    rng = np.random.default_rng(seed)
    grid = Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8))
    return grid.resize(size, Image.Resampling.NEAREST).convert(mode)


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def multipart(*parts: tuple[str | None, bytes], field: str = "files") -> bytes:
    """File parts with raw (unescaped) filenames: what a hostile client can put on the wire."""
    body = b""
    for filename, data in parts:
        disposition = f'form-data; name="{field}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body += (
            (
                f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    return body + f"--{BOUNDARY}--\r\n".encode()


def join_parts(parts: Iterable[bytes], boundary: str = "XyZ") -> bytes:
    """A multipart body from hand-written parts (headers included), for malformed cases."""
    return b"".join(b"--" + boundary.encode() + b"\r\n" + part for part in parts) + (
        b"--" + boundary.encode() + b"--\r\n"
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, *, bit_depth: int = 1, rows: int = 1) -> bytes:
    """A grayscale PNG whose header claims width x height; only ``rows`` rows of zeros follow."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    row = b"\x00" + bytes((width * bit_depth + 7) // 8)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(row * rows, 9))
        + _chunk(b"IEND", b"")
    )


def gif_declaring(width: int, height: int) -> bytes:
    """A GIF whose logical screen is width x height, holding one 1x1 frame."""
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0)  # global table of 2 colours
    palette = b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0)
    pixels = b"\x02\x02\x44\x01\x00"  # LZW min code size 2, one sub-block, terminator
    return b"GIF89a" + screen + palette + frame + pixels + b"\x3b"


def exif_rotated_jpeg(upright: Image.Image, orientation: int) -> bytes:
    """The pixels a camera stores, with the EXIF tag that tells viewers how to turn them."""
    undo = {
        3: Image.Transpose.ROTATE_180,
        6: Image.Transpose.ROTATE_90,
        8: Image.Transpose.ROTATE_270,
    }
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(upright.transpose(undo[orientation]), "JPEG", quality=95, exif=exif.tobytes())


def huge_metadata_jpeg(image: Image.Image) -> bytes:
    """A 60 KB EXIF description (near the 64 KB APP1 limit) and a 1 MB junk ICC profile."""
    exif = Image.Exif()
    exif[0x010E] = "A" * 60_000
    return encode(image, "JPEG", quality=95, exif=exif.tobytes(), icc_profile=b"\x00" * 1_000_000)


def animated_gif(first: Image.Image, *rest: Image.Image) -> bytes:
    return encode(first, "GIF", save_all=True, append_images=list(rest), duration=100, loop=0)


def sixteen_bit_png(gray: Image.Image) -> bytes:
    wide = np.asarray(gray, dtype=np.uint16) * 257  # 8-bit v -> 16-bit v * 257: exact round trip
    return encode(Image.fromarray(wide), "PNG")


def palette_with_transparency(image: Image.Image) -> bytes:
    palette = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(palette, "PNG", transparency=0)
