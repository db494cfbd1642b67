"""Reading the files loaded beside a checkpoint: LoRAs, hypernetworks and upscale models.

Each is opened like a checkpoint (state_files.py): .safetensors memory-mapped, pickles (.pt,
.pth, .ckpt ...) refused unless Loom runs with --allow-pickle-checkpoints and then read only
through torch.load(weights_only=True). What the tensors mean is the job of patches/lora.py,
patches/hypernetwork.py and networks/upscalers.py."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from engine.diffusion.checkpoints.safetensors_io import SafetensorsFile
from engine.diffusion.checkpoints.state_files import is_safetensors, load_pickle, open_state_file
from engine.diffusion.networks.upscalers import UpscaleModelError
from engine.diffusion.patches.hypernetwork import (
    Hypernetwork,
    HypernetworkError,
    hypernetwork_from_dict,
)
from engine.diffusion.patches.lora import LoraFile, parse_lora

# Real-ESRGAN files nest the weights under one of these keys.
UPSCALE_WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model")


def load_lora_file(path: Path, *, allow_pickle: bool = False) -> LoraFile:
    """Open (memory-mapped) and parse a LoRA file; pickle files only when allowed."""
    return parse_lora(open_state_file(path, allow_pickle=allow_pickle).tensors, path.name)


def load_hypernetwork(path: Path, *, allow_pickle: bool = False) -> Hypernetwork:
    """Read a `.safetensors` hypernetwork, or an A1111 `.pt` one when pickles are allowed."""
    if is_safetensors(path):
        return hypernetwork_from_dict(_hypernetwork_safetensors(path), path.name)
    data = load_pickle(path, allow_pickle=allow_pickle)
    if not isinstance(data, Mapping):
        raise HypernetworkError(f"{path.name}: expected a dict, got {type(data).__name__}")
    return hypernetwork_from_dict(data, path.name)


def _hypernetwork_safetensors(path: Path) -> dict[Any, Any]:
    """The `.pt` file's dict rebuilt from tensors `<width>.<0|1>.<layer key>` and JSON metadata."""
    opened = SafetensorsFile(path)
    data: dict[Any, Any] = {}
    for key, text in opened.metadata.items():
        try:
            data[key] = json.loads(text)
        except json.JSONDecodeError:
            data[key] = text
    for key in opened:
        parts = key.split(".", 2)
        if len(parts) != 3 or not parts[0].isdigit() or parts[1] not in ("0", "1"):
            raise HypernetworkError(f"{path.name}: tensor {key!r} is not named "
                                    "<width>.<0|1>.linear.<i>.<weight|bias>")
        width, slot, rest = parts
        data.setdefault(width, [{}, {}])[int(slot)][rest] = opened[key]
    return data


def read_upscale_state(path: Path, *, allow_pickle: bool = False) -> dict[str, Tensor]:
    """The tensors of an upscale model file (.safetensors, or .pth when pickles are allowed)."""
    if is_safetensors(path):
        return dict(SafetensorsFile(path))
    return _unwrap_upscale_state(load_pickle(path, allow_pickle=allow_pickle), path.name)


def _unwrap_upscale_state(loaded: object, source: str) -> dict[str, Tensor]:
    """The tensor dict inside a training checkpoint ({"params_ema": {...}} and the like)."""
    while isinstance(loaded, dict):
        wrapper = next((key for key in UPSCALE_WRAPPER_KEYS
                        if isinstance(loaded.get(key), dict)), None)
        if wrapper is None:
            return {key: value for key, value in loaded.items() if isinstance(value, Tensor)}
        loaded = loaded[wrapper]
    raise UpscaleModelError(f"{source}: expected a dict of tensors, got "
                            f"{type(loaded).__name__}")
