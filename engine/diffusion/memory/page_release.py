"""Dropping the resident pages of weights that are views of a memory-mapped model file.

A weight read in its file's dtype is a zero-copy view of the mapped checkpoint: its memory is
clean file pages, which the process can let go of at any time (madvise MADV_DONTNEED) and which
come back from the OS page cache, unchanged, the next time the weight is read (a minor fault per
page; ~0.4 s for 4 GB measured on this project's machine). The model manager uses this to keep
only the model that runs resident: the UNet's pages leave while the VAE decodes, the text
encoders' while the UNet samples.

Only pages known to be clean file pages are dropped: a range is released only when it lies in
a private file mapping of which the process has written no page (no copy-on-write copy, as
/proc/self/smaps' `Anonymous:` field of that mapping says), since dropping a written page
would bring back the file's bytes in its place. Anonymous memory (weights converted at load,
patched weights) is never touched. Linux only; elsewhere nothing is released."""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import logging
import mmap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger("loom.models")

MADV_DONTNEED = 4  # Linux's value (asm-generic/mman-common.h)
SMAPS = Path("/proc/self/smaps")


@dataclass(frozen=True)
class FileMapping:
    """One mapping of a file in this process, from /proc/self/smaps."""

    start: int
    end: int
    path: str
    rss: int  # resident bytes
    anonymous: int  # bytes of copy-on-write copies the process wrote into the mapping

    @property
    def clean(self) -> bool:
        return self.anonymous == 0

    def contains(self, start: int, end: int) -> bool:
        return self.start <= start and end <= self.end


def file_mappings(smaps: Path = SMAPS) -> list[FileMapping]:
    """The process's mappings of regular files, by address (empty where /proc is missing)."""
    try:
        text = smaps.read_text()
    except OSError:
        return []
    found: list[FileMapping] = []
    head: tuple[int, int, str] | None = None
    rss = 0
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 5 and "-" in fields[0] and ":" not in fields[0]:
            head = _mapping_head(fields)
        elif head is not None and fields[:1] == ["Rss:"]:
            rss = int(fields[1]) * 1024
        elif head is not None and fields[:1] == ["Anonymous:"]:
            found.append(FileMapping(*head, rss=rss, anonymous=int(fields[1]) * 1024))
            head = None
    return sorted(found, key=lambda mapping: mapping.start)


def _mapping_head(fields: list[str]) -> tuple[int, int, str] | None:
    """(start, end, path) of a mapping line when it maps a file by absolute path."""
    path = " ".join(fields[5:])
    if not path.startswith("/") or path.endswith("(deleted)"):
        return None
    start, end = (int(value, 16) for value in fields[0].split("-"))
    return start, end, path


def mapping_of(tensor: torch.Tensor, smaps: Path = SMAPS) -> FileMapping | None:
    """The file mapping `tensor`'s memory lies in, if any."""
    address = tensor.data_ptr()
    return next((m for m in file_mappings(smaps) if m.start <= address < m.end), None)


def weight_ranges(modules: Iterable[nn.Module]) -> Iterator[tuple[int, int]]:
    """(start, end) addresses of every CPU parameter and buffer of `modules`."""
    seen: set[int] = set()
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.device.type != "cpu" or tensor.numel() == 0 or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            start = tensor.data_ptr()
            yield start, start + tensor.numel() * tensor.element_size()


def page_interiors(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The whole pages inside each range, adjacent ones merged (a page shared with memory
    outside the ranges is kept)."""
    size = mmap.PAGESIZE
    pages = sorted((-(-start // size) * size, end // size * size) for start, end in ranges)
    merged: list[tuple[int, int]] = []
    for start, end in pages:
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class PageReleaser:
    """Drops the clean file pages under modules' weights (see the module docstring)."""

    def __init__(self, smaps: Path = SMAPS) -> None:
        self._smaps = smaps
        self._madvise = _libc_madvise()

    @property
    def available(self) -> bool:
        return self._madvise is not None and self._smaps.exists()

    def release(self, modules: Iterable[nn.Module]) -> int:
        """Drop the resident pages of `modules`' weights that are clean file pages; the bytes
        advised (whether or not they were resident)."""
        if not self.available:
            return 0
        mappings = [m for m in file_mappings(self._smaps) if m.clean]
        released = 0
        for start, end in page_interiors(self._in_clean_files(weight_ranges(modules), mappings)):
            if self._madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                             MADV_DONTNEED) == 0:
                released += end - start
        return released

    @staticmethod
    def _in_clean_files(ranges: Iterable[tuple[int, int]], mappings: list[FileMapping],
                        ) -> Iterator[tuple[int, int]]:
        """The ranges lying inside one of `mappings` (sorted by address)."""
        starts = [mapping.start for mapping in mappings]
        for start, end in ranges:
            index = bisect.bisect_right(starts, start) - 1
            if index >= 0 and mappings[index].contains(start, end):
                yield start, end


def _libc_madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name, use_errno=True).madvise
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    function.restype = ctypes.c_int
    return function
