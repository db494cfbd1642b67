"""Random diffusers model folders (what `save_pretrained` writes for a Stable Diffusion
pipeline), for tests: `model_index.json`; `unet/`, `vae/`, `text_encoder/` and/or
`text_encoder_2/`, each a config.json and weights in diffusers/HF naming.

The weights are those of `writer.random_checkpoint(kind, seed=...)`, renamed: a folder and the
same-seed single-file checkpoint hold the same model."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from engine.diffusion.checkpoints.diffusers_unet import diffusers_unet_config, ldm_unet_to_diffusers
from engine.diffusion.checkpoints.loader import strip_prefix
from engine.diffusion.checkpoints.text_encoders import hf_text_encoder_state
from engine.diffusion.checkpoints.writer import (
    RECIPES,
    random_checkpoint,
    text_config,
    unet_config,
    write_tensors,
)
from engine.diffusion.networks.clip_text import ClipTextModel, TextEncoderConfig
from engine.diffusion.networks.openclip_text import OpenClipTextModel

PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
             "sdxl": "StableDiffusionXLPipeline",
             "sdxl_refiner": "StableDiffusionXLImg2ImgPipeline"}
VAE_SCALE = {"sdxl": 0.13025, "sdxl_refiner": 0.13025}  # else SD1/SD2's 0.18215
WEIGHTS = "diffusion_pytorch_model.safetensors"
# LDM VAE names -> diffusers (the inverse of networks/vae.py's reading rules)
_VAE_RULES = (
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
)
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                  "proj_out": "to_out.0"}


def ldm_vae_to_diffusers(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """LDM VAE weights -> diffusers AutoencoderKL names (attention 1x1 convs become Linear)."""
    levels = 1 + max(int(m.group(1)) for key in tensors
                     if (m := re.match(r"decoder\.up\.(\d+)\.", key)))
    out = {}
    for key, value in tensors.items():
        for pattern, replacement in _VAE_RULES:
            key = re.sub(pattern, replacement, key)
        up = re.match(r"decoder\.up\.(\d+)\.(block|upsample)\.", key)
        if up:  # diffusers counts decoder levels from the deepest one
            part = "resnets." if up.group(2) == "block" else "upsamplers.0."
            key = f"decoder.up_blocks.{levels - 1 - int(up.group(1))}.{part}{key[up.end():]}"
        attention = re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)", key)
        if attention:
            key = (f"{attention.group(1)}.mid_block.attentions.0."
                   f"{_VAE_ATTENTION[attention.group(2)]}.{attention.group(3)}")
            if value.ndim == 4:
                value = value.flatten(1)
        out[key] = value
    return out


def vae_config(tensors: Mapping[str, Tensor], family: str) -> dict[str, Any]:
    """AutoencoderKL's config.json for LDM VAE weights."""
    levels = sorted({int(m.group(1)) for key in tensors
                     if (m := re.match(r"encoder\.down\.(\d+)\.", key))})
    widths = [tensors[f"encoder.down.{level}.block.0.conv1.weight"].shape[0] for level in levels]
    blocks = {int(m.group(1)) for key in tensors
              if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", key))}
    return {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
            "block_out_channels": widths, "layers_per_block": len(blocks),
            "down_block_types": ["DownEncoderBlock2D"] * len(widths),
            "up_block_types": ["UpDecoderBlock2D"] * len(widths),
            "latent_channels": tensors["decoder.conv_in.weight"].shape[1],
            "norm_num_groups": 32, "scaling_factor": VAE_SCALE.get(family, 0.18215)}


def text_encoder_json(config: TextEncoderConfig, with_projection: bool) -> dict[str, Any]:
    """transformers' CLIPTextConfig fields for an encoder."""
    return {"architectures": ["CLIPTextModelWithProjection" if with_projection
                              else "CLIPTextModel"],
            "hidden_size": config.width, "intermediate_size": config.mlp_width,
            "num_attention_heads": config.heads, "num_hidden_layers": config.layers,
            "hidden_act": config.activation, "layer_norm_eps": config.norm_eps,
            "max_position_embeddings": config.context_length, "vocab_size": config.vocab_size,
            "projection_dim": config.projection_dim or config.width}


def _write(folder: Path, component: str, tensors: Mapping[str, Tensor], name: str,
           config: Mapping[str, Any]) -> None:
    write_tensors(folder / component / name, tensors)
    (folder / component / "config.json").write_text(json.dumps(config, indent=2),
                                                     encoding="utf-8")


def write_random_diffusers(folder: Path, kind: str = "sd15", *, tiny: bool = True,
                           seed: int = 0) -> Path:
    """Write the diffusers folder of `random_checkpoint(kind, tiny=tiny, seed=seed)`."""
    tensors, metadata = random_checkpoint(kind, tiny=tiny, seed=seed)
    recipe = RECIPES[kind]
    family = metadata["loom.family"]
    config = unet_config(recipe, tiny)
    unet = strip_prefix(tensors, "model.diffusion_model.")
    _write(folder, "unet", ldm_unet_to_diffusers(unet, config, kind), WEIGHTS,
           diffusers_unet_config(config))
    vae = strip_prefix(tensors, "first_stage_model.")
    _write(folder, "vae", ldm_vae_to_diffusers(vae), WEIGHTS, vae_config(vae, family))
    names = ("text_encoder", "text_encoder_2") if len(recipe.text) == 2 else \
        ("text_encoder_2",) if family == "sdxl_refiner" else ("text_encoder",)
    components: dict[str, list[str]] = {"unet": ["diffusers", "UNet2DConditionModel"],
                                        "vae": ["diffusers", "AutoencoderKL"]}
    for name, (prefix, encoder_kind) in zip(names, recipe.text, strict=True):
        encoder_config = text_config(encoder_kind, tiny)
        module = (ClipTextModel if encoder_kind == "l" else OpenClipTextModel)(encoder_config)
        module.load_state_dict(strip_prefix(tensors, prefix), strict=False)
        projected = name == "text_encoder_2"
        _write(folder, name, hf_text_encoder_state(module), "model.safetensors",
               text_encoder_json(encoder_config, projected))
        components[name] = ["transformers", "CLIPTextModelWithProjection" if projected
                            else "CLIPTextModel"]
    index = {"_class_name": PIPELINES[family], **components}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder
