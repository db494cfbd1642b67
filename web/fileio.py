"""File helpers shared by the upload and user-data routes: bounded request bodies and writes
that never leave a half-written file where a good one was."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

MEGABYTE = 1024 * 1024
DEFAULT_MAX_UPLOAD_MB = 100.0
READ_CHUNK = 256 * 1024


def max_upload_bytes(args: Any) -> int:
    """--max-upload-size (MB) in bytes."""
    megabytes = getattr(args, "max_upload_size", None) or DEFAULT_MAX_UPLOAD_MB
    return int(float(megabytes) * MEGABYTE)


def too_large(limit: int) -> web.HTTPRequestEntityTooLarge:
    return web.HTTPRequestEntityTooLarge(
        max_size=limit, actual_size=limit + 1,
        text=f"413: the upload is larger than {limit // MEGABYTE} MB; raise --max-upload-size "
             f"to accept it")


async def read_limited(request: web.Request, limit: int) -> bytes:
    """The request body, refusing (413) more than `limit` bytes without reading them all."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    chunks, size = [], 0
    while chunk := await request.content.read(READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _write_temp(directory: Path, data: bytes) -> Path:
    fd, name = tempfile.mkstemp(dir=directory, prefix=".loom-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise
    return Path(name)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one step: readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _write_temp(path.parent, data)
    try:
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def write_new(path: Path, data: bytes) -> bool:
    """Create `path` with `data` unless it exists (then False); atomic and race-free."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _write_temp(path.parent, data)
    try:
        os.link(temp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: check, then rename (tiny race window)
        if path.exists():
            return False
        os.replace(temp, path)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def same_bytes(path: Path, data: bytes) -> bool:
    """Whether the file at `path` holds exactly `data`."""
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except FileNotFoundError:
        return False
