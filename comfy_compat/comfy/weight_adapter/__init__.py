"""ComfyUI's `comfy.weight_adapter` for custom-node packs: the LoRA-family adapter objects
`comfy.lora.load_lora` returns, each wrapping one Loom Adapter (patches/lora_formats.py) whose
math computes the delta.

Packs read `.name`, `.loaded_keys` and `.weights` (ComfyUI's tuples: LoRA (up, down, alpha,
mid, dora_scale, reshape), LoHa (w1_a, w1_b, alpha, w2_a, w2_b, t1, t2, dora_scale), LoKr (w1,
w2, alpha, w1_a, w1_b, w2_a, w2_b, t2, dora_scale)) and hand the adapter to add_patches; an
adapter built from such a tuple computes exactly what the file's adapter does."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor

from engine.diffusion.patches.lora_formats import Adapter, LoraFormatError, make_adapter

# each kind's weights tuple: the Loom role in each slot (None: a slot Loom has no role for)
WEIGHT_ROLES: Mapping[str, tuple[str | None, ...]] = MappingProxyType({
    "lora": ("up", "down", "alpha", "mid", "dora_scale", None),
    "loha": ("hada_w1_a", "hada_w1_b", "alpha", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
             "dora_scale"),
    "lokr": ("lokr_w1", "lokr_w2", "alpha", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b",
             "lokr_t2", "dora_scale"),
})


class WeightAdapterBase:
    """One adapted weight: `calculate_weight` adds strength * its delta to the weight given."""

    name: ClassVar[str] = ""

    def __init__(self, loaded_keys: set[str], adapter: Adapter) -> None:
        self.loaded_keys = loaded_keys
        self.adapter = adapter

    @property
    def weights(self) -> tuple[Any, ...]:
        tensors = self.adapter.tensors
        alpha = None if self.adapter.alpha is None else float(self.adapter.alpha)
        return tuple(alpha if role == "alpha" else tensors.get(role) if role else None
                     for role in WEIGHT_ROLES[self.name])

    def calculate_weight(self, weight: Tensor, key: str, strength: float,
                         strength_model: float, offset: Any,
                         function: Callable[[Tensor], Tensor] | None,
                         intermediate_dtype: torch.dtype = torch.float32,
                         original_weight: Tensor | None = None) -> Tensor:
        """`weight` (already narrowed to `offset` and scaled by strength_model by the caller)
        plus function(strength * delta), in place; DoRA reads the weight as it stands."""
        if self.adapter.weight_shape() is None or strength == 0.0:
            return weight
        delta = self.adapter.weight_delta(weight.to(torch.float32))
        change = strength * delta
        if function is not None:
            change = function(change)
        weight += change.to(weight.dtype)
        return weight


class LoRAAdapter(WeightAdapterBase):
    name = "lora"


class LoHaAdapter(WeightAdapterBase):
    name = "loha"


class LoKrAdapter(WeightAdapterBase):
    name = "lokr"


ADAPTER_CLASSES: Mapping[str, type[WeightAdapterBase]] = MappingProxyType(
    {cls.name: cls for cls in (LoRAAdapter, LoHaAdapter, LoKrAdapter)})


def wrap_adapter(adapter: Adapter) -> WeightAdapterBase:
    """The ComfyUI adapter object for a parsed Loom adapter of kind lora, loha or lokr."""
    cls = ADAPTER_CLASSES.get(adapter.kind)
    if cls is None:
        raise ValueError(f"a {adapter.kind!r} adapter has no ComfyUI adapter object; it is "
                         f"given to packs as a ('diff', (tensor,)) patch")
    return cls(set(adapter.keys), adapter)


def adapter_from_weights(kind: str, weights: tuple[Any, ...], key: str) -> WeightAdapterBase:
    """The adapter an old-style ("lora" | "loha" | "lokr", weights) patch value stands for."""
    roles = WEIGHT_ROLES.get(kind)
    if roles is None or len(weights) < len(roles) - 1:
        raise LoraFormatError(f"add_patches value ({kind!r}, {len(weights)} weights) for {key!r}"
                              f" is no LoRA, LoHa or LoKr weights tuple; expected "
                              f"{ {k: len(v) for k, v in WEIGHT_ROLES.items()} } entries")
    if kind == "lora" and len(weights) > 5 and weights[5] is not None:
        raise LoraFormatError(f"the LoRA patch for {key!r} asks to pad the weight to "
                              f"{weights[5]} (reshape_weight); Loom applies LoRA deltas only to "
                              f"weights of their own shape")
    tensors = {role: value for role, value in zip(roles, weights, strict=False)
               if role is not None and value is not None}
    alpha = tensors.pop("alpha", None)
    if alpha is not None:
        tensors["alpha"] = torch.as_tensor(alpha, dtype=torch.float32)
    return ADAPTER_CLASSES[kind](set(), make_adapter(tensors, ()))
