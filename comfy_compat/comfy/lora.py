"""ComfyUI's `comfy.lora` for custom-node packs (block-weight LoRA loaders, pack LoRA stacks):
key maps, `load_lora` and `calculate_weight`, over Loom's LoRA stack.

`load_lora` parses the state dict with Loom's parser (every format Loom reads: kohya, diffusers
/PEFT, LyCORIS LoCon/LoHa/LoKr, DoRA, diff) and returns {weight key: patch} as ComfyUI does:
comfy.weight_adapter objects for LoRA/LoHa/LoKr, ("diff", (tensor,)) for full and bias
differences, ("set", (tensor,)) for set_weight. Given to MODEL/CLIP.add_patches they are
applied at sampling / encoding time through `calculate_weight` as this module holds it then,
so a pack that wraps it sees every patch."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from loom_lora_names import clip_key_map, unet_key_map
from loom_weight_patches import calculate_weight
from torch import Tensor, nn

from comfy.weight_adapter import wrap_adapter
from engine.diffusion.networks.unet import UNet
from engine.diffusion.patches.lora import parse_lora

__all__ = ["calculate_weight", "load_lora", "model_lora_keys_clip", "model_lora_keys_unet"]

logger = logging.getLogger("loom.comfy.lora")


def _unet_of(model: Any) -> UNet:
    """The UNet behind what packs pass (`model_patcher.model`, a ModelPatcher, a UNet)."""
    if isinstance(model, UNet):
        return model
    handle = getattr(model, "handle", None)
    unet = getattr(handle, "unet", None)
    if not isinstance(unet, UNet):
        raise TypeError(f"comfy.lora.model_lora_keys_unet got a {type(model).__name__}; "
                        f"expected the MODEL's `.model` (model_lora_keys_unet(model.model))")
    return unet


def _encoders_of(model: Any) -> Mapping[str, nn.Module]:
    """The text encoders by name behind what packs pass (`clip.cond_stage_model`, a CLIP)."""
    stack = getattr(model, "stack", None)
    if stack is not None:
        return stack.encoders
    if isinstance(model, (nn.ModuleDict, Mapping)):
        return dict(model.items())
    raise TypeError(f"comfy.lora.model_lora_keys_clip got a {type(model).__name__}; expected "
                    f"the CLIP's `.cond_stage_model` (model_lora_keys_clip(clip.cond_stage_model))")


def model_lora_keys_unet(model: Any, key_map: dict[str, Any] | None = None) -> dict[str, Any]:
    """`key_map` (a new dict when None) plus LoRA module name -> "diffusion_model.<weight>"."""
    found = {} if key_map is None else key_map
    found.update(unet_key_map(_unet_of(model)))
    return found


def model_lora_keys_clip(model: Any, key_map: dict[str, Any] | None = None) -> dict[str, Any]:
    """`key_map` (a new dict when None) plus LoRA module name -> "clip_<x>.transformer.<...>"."""
    found = {} if key_map is None else key_map
    found.update(clip_key_map(_encoders_of(model)))
    return found


def _file_module(name: str) -> str:
    """The module name Loom's parser gives an old diffusers processor key ComfyUI spells
    "<attn>.processor.to_q" ("...processor.to_out" for to_out.0)."""
    if ".processor.to_" not in name:
        return name
    plain = name.replace(".processor.to_", ".to_")
    return f"{plain}.0" if plain.endswith(".to_out") else plain


def _bias_key(weight_key: Any) -> Any:
    return f"{weight_key.removesuffix('.weight')}.bias" if isinstance(weight_key, str) else None


def load_lora(lora: Mapping[str, Tensor], to_load: Mapping[str, Any], log_missing: bool = True
              ) -> dict[Any, Any]:
    """{model weight key: patch} for every module of `lora` that `to_load` names."""
    parsed = parse_lora(lora)
    patches: dict[Any, Any] = {}
    loaded: set[str] = set()
    for name, weight_key in to_load.items():
        adapter = parsed.adapters.get(name) or parsed.adapters.get(_file_module(name))
        if adapter is not None:
            loaded.update(adapter.keys)
            patches.update(_patches_of(adapter, weight_key))
        replacement = lora.get(f"{name}.set_weight")
        if replacement is not None:
            loaded.add(f"{name}.set_weight")
            patches[weight_key] = ("set", (replacement,))
    if log_missing:
        for key in lora:
            if key not in loaded:
                logger.warning("lora key not loaded: %s", key)
    return patches


def _patches_of(adapter: Any, weight_key: Any) -> dict[Any, Any]:
    """One parsed module's patches: its weight's (adapter or diff) and its bias difference."""
    found: dict[Any, Any] = {}
    if adapter.kind == "diff":
        if "diff" in adapter.tensors:
            found[weight_key] = ("diff", (adapter.tensors["diff"],))
    elif adapter.weight_shape() is not None:
        found[weight_key] = wrap_adapter(adapter)
    bias = adapter.tensors.get("diff_b")
    if bias is not None and _bias_key(weight_key) is not None:
        found[_bias_key(weight_key)] = ("diff", (bias,))
    return found
