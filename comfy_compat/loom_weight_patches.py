"""ComfyUI weight patches (`ModelPatcher.add_patches`, in comfy.lora.calculate_weight's formats)
as one Loom WeightDeltaPatch, so a pack's model merge or weight diff changes the sampled model.

Each key's entries are (strength_patch, value, strength_model, offset, function), applied in
order to the weight in float32: the weight is first scaled by strength_model; a value that is a
list is another model's weight ((weight, convert_func) first, then its own entries), which
becomes a diff; ("diff", (tensor,)) or (tensor,) adds strength * tensor; ("set", (tensor,))
replaces the weight. `offset` (dim, start, length) narrows all of that to a slice. LoRA-style
adapter objects (comfy.weight_adapter) and "model_as_lora" are refused with their names.
A CLIP's patches are keyed "<encoder>.<parameter>" (its get_sd names) and patch that encoder."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from loom_model_options import UnsupportedPatchError
from torch import Tensor

from engine.diffusion.patches.weight_patches import ParamDelta, WeightDeltaPatch

logger = logging.getLogger("loom.comfy.weights")

UNET_PREFIX = "diffusion_model."


def pack_weight_patch(patches: Mapping[str, Sequence[Any]], prefix: str = UNET_PREFIX,
                      ) -> WeightDeltaPatch:
    """The weight patches recorded by add_patches, keys "<prefix><parameter name>" (the UNet's
    "diffusion_model.", a CLIP encoder's "<encoder>.")."""
    return WeightDeltaPatch(tuple(
        ParamDelta(key.removeprefix(prefix), _delta(key, list(entries)), 1.0)
        for key, entries in patches.items()))


def _delta(key: str, entries: list[Any]) -> Callable[[Tensor], Tensor]:
    def delta(current: Tensor) -> Tensor:
        return calculate_weight(entries, current.clone(), key) - current

    return delta


def calculate_weight(entries: Sequence[Any], weight: Tensor, key: str) -> Tensor:
    """`weight` (float32, changed in place) after each entry, as ComfyUI computes it."""
    with torch.no_grad():
        for entry in entries:
            strength, value, strength_model, offset, function = _fields(entry, key)
            target = weight if offset is None else weight.narrow(*offset)
            if strength_model != 1.0:
                target.mul_(strength_model)
            if isinstance(value, list):
                value = (_nested(value, key),)
            _apply(target, value, strength, function or (lambda a: a), key)
    return weight


def _fields(entry: Any, key: str) -> tuple[float, Any, float, Any, Any]:
    if not isinstance(entry, (tuple, list)) or len(entry) < 3:
        raise UnsupportedPatchError(f"add_patches entry for {key!r} is {type(entry).__name__}; "
                                    f"expected (strength_patch, value, strength_model, ...)")
    padded = tuple(entry) + (None,) * (5 - len(entry))
    return float(padded[0]), padded[1], float(padded[2]), padded[3], padded[4]


def _nested(value: list[Any], key: str) -> Tensor:
    """Another model's weight under its own entries (get_key_patches' list format)."""
    first = value[0]
    if isinstance(first, (tuple, list)):
        tensor, convert = first[0], first[1] if len(first) > 1 else None
    else:
        tensor, convert = first, None
    weight = tensor.to(torch.float32, copy=True)
    if convert is not None:
        weight = convert(weight, inplace=True)
    return calculate_weight(value[1:], weight, key)


def _apply(target: Tensor, value: Any, strength: float, function: Callable[[Tensor], Tensor],
           key: str) -> None:
    if not isinstance(value, (tuple, list)) or len(value) not in (1, 2):
        raise UnsupportedPatchError(
            f"add_patches value for {key!r} is a {type(value).__name__}: Loom applies diff, set "
            f"and model-merge patches; LoRA files go through comfy.sd.load_lora_for_models or "
            f"the LoraLoader node")
    kind, payload = ("diff", value) if len(value) == 1 else (value[0], value[1])
    if kind == "diff":
        diff = payload[0]
        if diff.shape != target.shape:
            logger.warning("patch for %s not merged: shape %s != weight %s", key,
                           tuple(diff.shape), tuple(target.shape))
        elif strength != 0.0:
            target.add_(function(strength * diff.to(target.device, torch.float32)))
    elif kind == "set":
        target.copy_(payload[0])
    else:
        raise UnsupportedPatchError(f"add_patches patch type {kind!r} for {key!r} is not "
                                    f"supported in Loom; use diff, set or a model merge")
