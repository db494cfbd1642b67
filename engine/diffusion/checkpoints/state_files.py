"""Opening model files: .safetensors memory-mapped, pickles only when the user opted in.

Pickle files (.ckpt/.pt/.pth/.bin) can run code when unpickled, so every model file of every
kind (checkpoints, LoRAs, ControlNets, hypernetworks, upscalers) is refused in that format
unless Loom runs with --allow-pickle-checkpoints, and even then it is read only through
torch.load(weights_only=True), which rebuilds tensors and plain containers and nothing else."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from engine.diffusion.checkpoints.safetensors_io import SafetensorsFile

SAFETENSORS_SUFFIXES = frozenset({".safetensors", ".sft"})
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pt2"})


class CheckpointError(ValueError):
    """A model file that cannot be loaded; the message names the file and the fix."""


@dataclass(frozen=True)
class StateFile:
    """An opened model file: tensors by name (lazy for safetensors) and its metadata."""

    path: Path
    tensors: Mapping[str, Tensor]
    metadata: Mapping[str, str]


def is_safetensors(path: Path) -> bool:
    return path.suffix.lower() in SAFETENSORS_SUFFIXES


def load_pickle(path: Path, *, allow_pickle: bool, mmap: bool = False) -> object:
    """What a pickle model file holds, read with torch.load(weights_only=True); refused unless
    the user allowed pickle files."""
    suffix = path.suffix.lower()
    if suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path.name}: unknown model file type {suffix!r}; use "
                              f".safetensors (or .ckpt/.pt with --allow-pickle-checkpoints)")
    if not allow_pickle:
        raise CheckpointError(
            f"{path.name} is a pickle file, which can run code when loaded; Loom refuses "
            f"pickle files by default. Convert it to .safetensors, or start Loom with "
            f"--allow-pickle-checkpoints to load it with torch.load(weights_only=True)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is reported the same way
        raise CheckpointError(f"{path.name}: torch.load(weights_only=True) failed: "
                              f"{type(exc).__name__}: {exc}") from exc


def open_state_file(path: Path, *, allow_pickle: bool = False) -> StateFile:
    """Open a .safetensors file, or a pickle checkpoint when `allow_pickle` (weights only)."""
    if is_safetensors(path):
        opened = SafetensorsFile(path)
        return StateFile(path, opened, opened.metadata)
    loaded = load_pickle(path, allow_pickle=allow_pickle, mmap=True)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path.name}: expected a dict of tensors, got "
                              f"{type(loaded).__name__}")
    return StateFile(path, {k: v for k, v in state.items() if isinstance(v, Tensor)}, {})
