"""ComfyUI's `comfy.ops` for custom-node packs: layer classes that skip weight initialisation
(their weights are loaded right after), under ComfyUI's names."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class disable_weight_init:  # noqa: N801 - ComfyUI's name
    """torch layers whose reset_parameters does nothing (weights come from a file)."""

    class Linear(nn.Linear):
        comfy_cast_weights = False

        def reset_parameters(self) -> None:
            return None

    class Conv1d(nn.Conv1d):
        comfy_cast_weights = False

        def reset_parameters(self) -> None:
            return None

    class Conv2d(nn.Conv2d):
        comfy_cast_weights = False

        def reset_parameters(self) -> None:
            return None

    class Conv3d(nn.Conv3d):
        comfy_cast_weights = False

        def reset_parameters(self) -> None:
            return None

    class GroupNorm(nn.GroupNorm):
        comfy_cast_weights = False

        def reset_parameters(self) -> None:
            return None

    class LayerNorm(nn.LayerNorm):
        comfy_cast_weights = False

        def reset_parameters(self) -> None:
            return None

    class ConvTranspose2d(nn.ConvTranspose2d):
        comfy_cast_weights = False

        def reset_parameters(self) -> None:
            return None

    class Embedding(nn.Embedding):
        comfy_cast_weights = False

        def reset_parameters(self) -> None:
            return None

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
