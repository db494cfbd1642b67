"""ComfyUI's `comfy.ops` for custom-node packs: layer classes that skip weight initialisation
(their weights are loaded right after), under ComfyUI's names."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _without_init(layer: type[nn.Module]) -> type[nn.Module]:
    """`layer` whose reset_parameters does nothing (its weights come from a file)."""
    return type(layer.__name__, (layer,), {"comfy_cast_weights": False,
                                          "reset_parameters": lambda self: None,
                                          "__module__": __name__})


class disable_weight_init:  # noqa: N801 - ComfyUI's name
    """torch layers that skip weight initialisation, under ComfyUI's names."""

    Linear = _without_init(nn.Linear)
    Conv1d = _without_init(nn.Conv1d)
    Conv2d = _without_init(nn.Conv2d)
    Conv3d = _without_init(nn.Conv3d)
    GroupNorm = _without_init(nn.GroupNorm)
    LayerNorm = _without_init(nn.LayerNorm)
    ConvTranspose2d = _without_init(nn.ConvTranspose2d)
    Embedding = _without_init(nn.Embedding)

    @classmethod
    def conv_nd(cls, dims: int, *args: Any, **kwargs: Any) -> nn.Module:
        layers = {1: cls.Conv1d, 2: cls.Conv2d, 3: cls.Conv3d}
        if dims not in layers:
            raise ValueError(f"conv_nd: unsupported dimensions {dims}; use 1, 2 or 3")
        return layers[dims](*args, **kwargs)


class manual_cast(disable_weight_init):  # noqa: N801 - ComfyUI's name
    """Loom computes in the weights' dtype, so casting layers are the plain ones."""


def cast_bias_weight(s: nn.Module, input: torch.Tensor | None = None, dtype: Any = None,
                     device: Any = None, bias_dtype: Any = None) -> tuple[Any, Any]:
    if input is not None:
        dtype = dtype or input.dtype
        device = device or input.device
    weight = s.weight.to(device=device, dtype=dtype)
    bias = s.bias.to(device=device, dtype=bias_dtype or dtype) if s.bias is not None else None
    return weight, bias


def pick_operations(weight_dtype: Any, compute_dtype: Any, load_device: Any = None,
                    disable_fast_fp8: bool = False, fp8_optimizations: bool = False,
                    scaled_fp8: Any = None, model_config: Any = None) -> type:
    return disable_weight_init
