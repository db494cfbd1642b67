"""ComfyUI's LoRA key maps (comfy.lora.model_lora_keys_unet / _clip) and weight names, built
from Loom's own module tables (patches/lora_keys.py).

ComfyUI names a UNet weight "diffusion_model.<LDM name>" (Loom's UNet parameter names are the
LDM's) and a text-encoder weight "clip_<l|g|h>.transformer.<HF CLIPTextModel name>" (bigG in HF
layout: q/k/v separate, text_projection a Linear weight), which Loom keeps as rows of
in_proj_weight and a transposed matrix. The maps hold the LoRA-side spellings ComfyUI accepts
for those weights; entries ComfyUI also makes for weights the model lacks (the last level's
downsampler, a text_projection on CLIP-L) are left out, since nothing could patch them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from engine.diffusion.networks.unet import UNet
from engine.diffusion.patches.lora_keys import text_paths, unet_paths

UNET_PREFIX = "diffusion_model."
# the per-layer text-encoder modules kohya and diffusers LoRAs name (HF path -> kohya spelling)
LAYER_MODULES = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj",
                 "self_attn.v_proj", "self_attn.out_proj")


def unet_key_map(unet: UNet) -> dict[str, str]:
    """LoRA module name -> "diffusion_model.<weight>", as model_lora_keys_unet gives them."""
    found: dict[str, str] = {}
    for name in unet.state_dict():
        full = UNET_PREFIX + name
        if name.endswith(".weight"):
            module = name.removesuffix(".weight")
            found[f"lora_unet_{module.replace('.', '_')}"] = full
            found[UNET_PREFIX + module] = full
        else:
            found[full] = full
    for diffusers, target in unet_paths(unet, unet.config).values():
        full = UNET_PREFIX + target.weight
        for name in _diffusers_aliases(diffusers):
            underscored = name.replace(".", "_")
            found[f"lora_unet_{underscored}"] = full
            found[f"lycoris_{underscored}"] = full
            processor = name.replace(".to_", ".processor.to_")
            if processor.endswith(".to_out.0"):
                processor = processor.removesuffix(".0")
            found[processor] = full
            found[f"unet.{processor}"] = full
    return found


def _diffusers_aliases(diffusers: str) -> tuple[str, ...]:
    """SDXL's label embedding answers to diffusers' add_embedding and class_embedding names."""
    if diffusers.startswith("add_embedding."):
        return diffusers, diffusers.replace("add_embedding.", "class_embedding.", 1)
    return (diffusers,)


@dataclass(frozen=True)
class ClipWeight:
    """Where a ComfyUI CLIP weight name lies in Loom's text encoders."""

    encoder: str
    param: str
    rows: tuple[int, int] | None = None
    transposed: bool = False


def clip_weights(encoders: Mapping[str, nn.Module]) -> dict[str, ClipWeight]:
    """ComfyUI CLIP parameter name ("clip_l.transformer.text_model....weight") -> Loom's."""
    found = {}
    for name, encoder in encoders.items():
        for path, target in text_paths(encoder, name).items():
            prefix = f"clip_{name}.transformer.{path}"
            found[f"{prefix}.weight"] = ClipWeight(name, target.weight, target.rows,
                                                   target.transposed)
            if target.bias is not None:
                found[f"{prefix}.bias"] = ClipWeight(name, target.bias, target.rows)
    return found


def clip_key_map(encoders: Mapping[str, nn.Module]) -> dict[str, str]:
    """LoRA module name -> ComfyUI CLIP weight name, as model_lora_keys_clip gives them."""
    found: dict[str, str] = {}
    weights = [key for key in clip_weights(encoders) if key.endswith(".weight")]
    for key in weights:
        found["text_encoders." + key.removesuffix(".weight")] = key
    for name, encoder in encoders.items():
        paths = text_paths(encoder, name)
        spellings = _layer_prefixes(name, tuple(encoders))
        for path in paths:
            layer = path.removeprefix("text_model.encoder.layers.")
            index, _, module = layer.partition(".")
            if module not in LAYER_MODULES:
                continue
            key = f"clip_{name}.transformer.{path}.weight"
            for kohya, diffusers in spellings:
                found[f"{kohya}text_model_encoder_layers_{index}_{module.replace('.', '_')}"] = key
                if diffusers:
                    found[f"{diffusers}{path}"] = key
    if "g" in encoders:
        projection = "clip_g.transformer.text_projection.weight"
        found["lora_prior_te_text_projection"] = projection
        found["lora_te2_text_projection"] = projection
    return found


def _layer_prefixes(name: str, names: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """(kohya prefix, diffusers prefix) pairs ComfyUI gives an encoder's layers."""
    if name in ("l", "h"):
        return ("lora_te_", "text_encoder."), ("lora_te1_", "")
    if "l" in names:
        return (("lora_te2_", "text_encoder_2."),)
    return ("lora_te_", "text_encoder."), ("lora_prior_te_", "")

