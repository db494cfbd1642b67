"""ComfyUI weight patches (`ModelPatcher.add_patches`, in comfy.lora.calculate_weight's formats)
as one Loom WeightDeltaPatch, so a pack's model merge or weight diff changes the sampled model.

Each key's entries are (strength_patch, value, strength_model, offset, function), applied in
order to the weight in float32: the weight is first scaled by strength_model; a value that is a
list is another model's weight ((weight, convert_func) first, then its own entries), which
becomes a diff; ("diff", (tensor,)) or (tensor,) adds strength * tensor; ("set", (tensor,))
replaces the weight; a comfy.weight_adapter object (what comfy.lora.load_lora returns) or an
old-style ("lora" | "loha" | "lokr", weights) value adds strength * its delta, computed by
Loom's LoRA math (DoRA included). `offset` (dim, start, length) narrows all of that to a slice.
Other patch types ("model_as_lora", "glora", ...) are refused with their names.

Each weight's entries go through `comfy.lora.calculate_weight` as that module holds it when
the patch is applied (sampling or encoding), as in ComfyUI, so a pack that wraps it (Easy-Use's
Fooocus inpaint patch) handles its own entries and hands the rest to Loom's function below."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from comfy.weight_adapter import WEIGHT_ROLES, WeightAdapterBase, adapter_from_weights
from loom_model_options import UnsupportedPatchError
from torch import Tensor

from engine.diffusion.patches.weight_patches import ParamDelta, WeightDeltaPatch

logger = logging.getLogger("loom.comfy.weights")

UNET_PREFIX = "diffusion_model."


@dataclass(frozen=True)
class WeightSlot:
    """The Loom parameter a patched key means: rows [start, stop) of it when `rows`, and
    `transposed` when Loom stores it transposed to ComfyUI's layout (OpenCLIP's projection)."""

    param: str
    rows: tuple[int, int] | None = None
    transposed: bool = False


def unet_slot(key: str) -> WeightSlot:
    """A UNet key "diffusion_model.<parameter>": Loom's UNet uses the same parameter names."""
    return WeightSlot(key.removeprefix(UNET_PREFIX))


def pack_weight_patch(patches: Mapping[str, Sequence[Any]],
                      slot: Callable[[str], WeightSlot] = unet_slot) -> WeightDeltaPatch:
    """The weight patches recorded by add_patches, each key placed by `slot`."""
    deltas = []
    for key, entries in patches.items():
        where = slot(key)
        deltas.append(ParamDelta(where.param, _delta(key, list(entries), where.transposed), 1.0,
                                 where.rows))
    return WeightDeltaPatch(tuple(deltas))


def split_patch_key(key: Any) -> tuple[str, Any, Any]:
    """(weight key, offset, function) of an add_patches key: a name, or ComfyUI's
    (name, (dim, start, length)[, function]) tuple for a slice of a fused weight."""
    if not isinstance(key, tuple):
        return key, None, None
    return key[0], key[1] if len(key) > 1 else None, key[2] if len(key) > 2 else None


def record_patches(recorded: dict[str, list[Any]], patches: Mapping[Any, Any],
                   known: Container[str], strength_patch: float, strength_model: float
                   ) -> list[Any]:
    """add_patches: each patch whose weight is `known` appended to `recorded` as ComfyUI's
    (strength_patch, value, strength_model, offset, function) entry; the keys taken."""
    added = []
    for key, patch in patches.items():
        name, offset, function = split_patch_key(key)
        if name in known:
            recorded.setdefault(name, []).append(
                (strength_patch, patch, strength_model, offset, function))
            added.append(key)
    return added


def bound_calculate_weight() -> Callable[..., Tensor]:
    """comfy.lora.calculate_weight as bound now (a pack may have wrapped it)."""
    return importlib.import_module("comfy.lora").calculate_weight


def _delta(key: str, entries: list[Any], transposed: bool) -> Callable[[Tensor], Tensor]:
    def delta(current: Tensor) -> Tensor:
        weight = current.t() if transposed else current
        result = bound_calculate_weight()(entries, weight.clone(), key)
        if result.shape != weight.shape:
            raise UnsupportedPatchError(
                f"comfy.lora.calculate_weight returned shape {tuple(result.shape)} for {key!r} "
                f"of shape {tuple(weight.shape)}: Loom patches weights in place and cannot "
                f"change a layer's shape (a pack widening it, e.g. Layer Diffuse's channel "
                f"change); use a model with that layout instead")
        change = result - weight
        return change.t() if transposed else change

    return delta


def calculate_weight(patches: Sequence[Any], weight: Tensor, key: str,
                     intermediate_dtype: torch.dtype = torch.float32,
                     original_weights: Any = None) -> Tensor:
    """`weight` (float32, changed in place) after each entry, as ComfyUI computes it."""
    with torch.no_grad():
        for entry in patches:
            strength, value, strength_model, offset, function = _fields(entry, key)
            target = weight if offset is None else weight.narrow(*offset)
            if strength_model != 1.0:
                target.mul_(strength_model)
            if isinstance(value, list):
                value = (_nested(value, key),)
            if isinstance(value, WeightAdapterBase):
                _adapt(value, target, key, (strength, strength_model, offset, function))
                continue
            _apply(target, value, strength, function or (lambda a: a), key)
    return weight


def _adapt(adapter: WeightAdapterBase, target: Tensor, key: str, args: tuple[Any, ...]) -> None:
    output = adapter.calculate_weight(target, key, *args)
    if output is None:
        logger.warning("%s adapter computed no weight for %s; left unchanged", adapter.name, key)
    elif output is not target:
        target.copy_(output)


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
    return bound_calculate_weight()(value[1:], weight, key)


def _apply(target: Tensor, value: Any, strength: float, function: Callable[[Tensor], Tensor],
           key: str) -> None:
    if not isinstance(value, (tuple, list)) or len(value) not in (1, 2):
        raise UnsupportedPatchError(
            f"add_patches value for {key!r} is a {type(value).__name__}: Loom applies diff, set, "
            f"model-merge patches and the adapters comfy.lora.load_lora returns; whole LoRA "
            f"files go through comfy.sd.load_lora_for_models or the LoraLoader node")
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
    elif kind in WEIGHT_ROLES:
        _adapt(adapter_from_weights(kind, tuple(payload), key), target, key,
               (strength, 1.0, None, function))
    else:
        raise UnsupportedPatchError(f"add_patches patch type {kind!r} for {key!r} is not "
                                    f"supported in Loom; use diff, set, a model merge or a "
                                    f"LoRA/LoHa/LoKr adapter from comfy.lora.load_lora")
