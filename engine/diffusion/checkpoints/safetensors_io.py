"""Zero-copy reading of .safetensors files: the file is memory-mapped once and each tensor is a
view into the mapping, created when first asked for. Nothing is copied before use. A tensor read
in another dtype (e.g. an fp16 file for an fp32 or bf16 model) is converted one at a time, and
the file pages it was converted from leave the process at once (`cast`, `CastOnRead`), so a
load holds each weight once, never the file and the converted copy together. A weight held in
the file's own dtype (memory/cast_on_use.py `Holding`) stays the zero-copy view.

Format facts: 8 bytes little-endian header length N, then N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the
raw little-endian tensor data, offsets relative to the end of the header."""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.diffusion.memory.cast_on_use import Holding

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100 * 2**20


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file; the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """(tensor infos, metadata, offset of the data section) without reading any tensor data."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) != 8:
                raise SafetensorsError(f"{path}: too short to be a safetensors file")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES:
                raise SafetensorsError(f"{path}: header of {length} bytes is not plausible; "
                                       f"the file is not safetensors or is damaged")
            raw = handle.read(length)
    except OSError as exc:
        raise SafetensorsError(f"cannot read {path}: {exc}") from exc
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SafetensorsError(f"{path}: header is not JSON ({exc}); the file is damaged or "
                               f"not safetensors") from exc
    metadata = header.pop("__metadata__", None) or {}
    infos = {name: _tensor_info(path, name, entry) for name, entry in header.items()}
    return infos, metadata, 8 + length


def _tensor_info(path: Path, name: str, entry: dict) -> TensorInfo:
    dtype = entry.get("dtype")
    if dtype not in DTYPES:
        raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    begin, end = entry["data_offsets"]
    return TensorInfo(dtype, tuple(int(d) for d in entry["shape"]), int(begin), int(end))


class SafetensorsFile(Mapping[str, torch.Tensor]):
    """A read-only name -> tensor mapping over a memory-mapped safetensors file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.infos, self.metadata, self._data_start = read_header(self.path)
        size = self.path.stat().st_size
        for name, info in self.infos.items():
            if self._data_start + info.end > size or info.begin > info.end:
                raise SafetensorsError(f"{self.path}: tensor {name!r} lies outside the file "
                                       f"(truncated download?)")
        with open(self.path, "rb") as handle:  # the mapping outlives the descriptor
            # copy-on-write (MAP_PRIVATE): writing into a weight never changes the file
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        dtype = DTYPES[info.dtype]
        start = self._data_start + info.begin
        flat = self._bytes[start:self._data_start + info.end]
        try:
            return flat.view(dtype).reshape(info.shape)
        except RuntimeError:  # offset not aligned to the element size: copy this one tensor
            return flat.clone().view(dtype).reshape(info.shape)

    def cast(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor `name` in `dtype` (floating tensors only; others as stored). A converted
        copy releases the file pages it was read from, so the file and the copy are never both
        resident; a same-dtype tensor is the zero-copy view."""
        tensor = self[name]
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            return tensor
        converted = tensor.to(dtype)
        del tensor
        info = self.infos[name]
        self._release(self._data_start + info.begin, self._data_start + info.end)
        return converted

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor`'s memory lies in this file's mapping (a zero-copy view)."""
        start = self._bytes.data_ptr()
        return start <= tensor.data_ptr() < start + self._bytes.numel()

    def _release(self, start: int, end: int) -> None:
        """Drop this process's resident pages of bytes start..end (only whole pages: a page
        shared with a neighbouring tensor stays). Clean copy-on-write pages come back from the
        file if read again; where the OS has no madvise, the pages stay until unmapped."""
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first and hasattr(self._map, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def nbytes(self) -> int:
        return sum(info.end - info.begin for info in self.infos.values())


def shapes_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Name -> shape, without touching tensor data when `state` is a SafetensorsFile."""
    if isinstance(state, CastOnRead):
        return shapes_of(state.tensors)
    if isinstance(state, SafetensorsFile):
        return {name: info.shape for name, info in state.infos.items()}
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def floating_tensors(state: Mapping[str, torch.Tensor]
                     ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, stored dtype) of the floating-point tensors (the weights; not ids or step
    counters), without touching tensor data when `state` is a SafetensorsFile."""
    if isinstance(state, CastOnRead):
        return floating_tensors(state.tensors)
    if isinstance(state, SafetensorsFile):
        return {name: (info.shape, DTYPES[info.dtype]) for name, info in state.infos.items()
                if DTYPES[info.dtype].is_floating_point}
    return {name: (tuple(t.shape), t.dtype) for name, t in state.items() if t.is_floating_point()}


# what CastOnRead reads the tensors under a key prefix as: one dtype, or a component's Holding
ReadRule = torch.dtype | Holding


def read_dtype(rule: ReadRule, stored: torch.dtype) -> torch.dtype:
    """The dtype `rule` reads a floating tensor stored as `stored` in."""
    return rule.dtype_for(stored) if isinstance(rule, Holding) else rule


def _rule_for(rules: Mapping[str, ReadRule], name: str) -> ReadRule | None:
    return next((rule for prefix, rule in rules.items() if name.startswith(prefix)), None)


def weight_bytes(state: Mapping[str, torch.Tensor], rules: Mapping[str, ReadRule]) -> int:
    """Bytes `state`'s floating tensors take once read by CastOnRead(state, rules); tensors under
    none of the prefixes are not counted. A safetensors file's size comes from its header."""
    total = 0
    for name, (shape, stored) in floating_tensors(state).items():
        rule = _rule_for(rules, name)
        total += 0 if rule is None else math.prod(shape) * read_dtype(rule, stored).itemsize
    return total


class CastOnRead(Mapping[str, torch.Tensor]):
    """`tensors` with each floating tensor under one of `rules`' key prefixes read as the first
    matching prefix's rule says (a dtype, or a Holding: possibly as stored); others as stored.
    Reading from a SafetensorsFile releases the source pages of every converted tensor
    (SafetensorsFile.cast). Nothing is converted before it is read, so wrap a whole checkpoint
    with one component's prefixes and hand it to that component's loader."""

    def __init__(self, tensors: Mapping[str, torch.Tensor],
                 rules: Mapping[str, ReadRule]) -> None:
        self.tensors = tensors
        self.rules = rules

    def __getitem__(self, name: str) -> torch.Tensor:
        rule = _rule_for(self.rules, name)
        if rule is None:
            return self.tensors[name]
        if isinstance(self.tensors, SafetensorsFile):
            info = self.tensors.infos[name]
            return self.tensors.cast(name, read_dtype(rule, DTYPES[info.dtype]))
        tensor = self.tensors[name]
        if not tensor.is_floating_point():
            return tensor
        return tensor.to(read_dtype(rule, tensor.dtype))

    def __contains__(self, name: object) -> bool:
        return name in self.tensors  # without reading (and converting) the tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)
