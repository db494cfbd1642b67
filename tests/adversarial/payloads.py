"""Hostile inputs the adversarial tests send: image bombs built chunk by chunk (tiny files that
declare huge pictures), raw multipart bodies aiohttp's client refuses to build, and a JSON parser
as strict as a browser's JSON.parse."""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload)))


def _frame_control(sequence: int, width: int, height: int) -> bytes:
    # fcTL: sequence, size, offset (0, 0), delay 1/10 s, dispose none, blend source
    return png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", sequence, width, height, 0, 0, 1, 10,
                                          0, 0))


def apng_bomb(width: int, height: int, frames: int) -> bytes:
    """An animated PNG of `frames` frames of width x height 1-bit pixels: the first frame is
    the whole (all black, so it compresses to almost nothing) canvas, every later frame a 1x1
    patch that still decodes to the whole canvas. 4000x4000 x 300 is ~25 KB on disk."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    chunks = [png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)),
              png_chunk(b"acTL", struct.pack(">II", frames, 0)),
              _frame_control(0, width, height),
              png_chunk(b"IDAT", zlib.compress(row * height, 9))]
    patch = zlib.compress(b"\x00\x00", 9)  # one row: filter byte + one byte of bits
    for index in range(1, frames):
        sequence = 2 * index - 1
        chunks.append(_frame_control(sequence, 1, 1))
        chunks.append(png_chunk(b"fdAT", struct.pack(">I", sequence + 1) + patch))
    return PNG_SIGNATURE + b"".join(chunks) + png_chunk(b"IEND", b"")


def one_bit_png(width: int, height: int) -> bytes:
    """A plain 1-bit PNG (a few KB for 9000x9000) that decodes to width x height pixels."""
    row = b"\x00" * (1 + (width + 7) // 8)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0,
                                                           0, 0))
            + png_chunk(b"IDAT", zlib.compress(row * height, 9)) + png_chunk(b"IEND", b""))


def multipart(filename: bytes, data: bytes, boundary: bytes = b"LoomBoundary") -> bytes:
    """A multipart/form-data body with one `image` part, its header written byte for byte."""
    return (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"image\"; filename=\""
            + filename + b"\"\r\nContent-Type: image/png\r\n\r\n" + data + b"\r\n--" + boundary
            + b"--\r\n")


def multipart_headers(boundary: str = "LoomBoundary") -> dict[str, str]:
    return {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (a browser's JSON.parse refuses it)")


def browser_json(text: str | bytes) -> Any:
    """Parse as strictly as JSON.parse: NaN, Infinity and -Infinity are errors."""
    return json.loads(text, parse_constant=_no_constant)
