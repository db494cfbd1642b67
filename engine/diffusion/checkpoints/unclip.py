"""SD 2.1 unCLIP checkpoints: the CLIP vision tower they carry under `embedder.model.visual.`
in OpenCLIP naming, converted to (and, for the test writer, from) the HF naming of
networks/clip_vision.py; unCLIPCheckpointLoader returns it as the fourth output."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from engine.diffusion.networks.clip_vision import ClipVisionModel, load_clip_vision

UNCLIP_VISION_PREFIX = "embedder.model.visual."
NOISE_AUGMENTOR_PREFIX = "noise_augmentor."
_HF = "vision_model."
# OpenCLIP visual names -> HF CLIPVisionModelWithProjection names (outside the layers)
_TOP = {"conv1.weight": _HF + "embeddings.patch_embedding.weight",
        "class_embedding": _HF + "embeddings.class_embedding",
        "positional_embedding": _HF + "embeddings.position_embedding.weight",
        "ln_pre.weight": _HF + "pre_layrnorm.weight", "ln_pre.bias": _HF + "pre_layrnorm.bias",
        "ln_post.weight": _HF + "post_layernorm.weight",
        "ln_post.bias": _HF + "post_layernorm.bias"}
_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def openclip_visual_to_hf(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """OpenCLIP `visual.*` keys (without the prefix) -> HF vision keys (in_proj split into
    q/k/v, `proj` transposed into visual_projection.weight)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in _TOP:
            out[_TOP[key]] = value
        elif key == "proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif key.startswith("transformer.resblocks."):
            index, name = key.removeprefix("transformer.resblocks.").split(".", 1)
            base = f"{_HF}encoder.layers.{index}."
            module, leaf = name.rsplit(".", 1)
            if module == "attn" and leaf.startswith("in_proj_"):
                kind = leaf.removeprefix("in_proj_")
                for part, chunk in zip("qkv", value.chunk(3, dim=0), strict=True):
                    out[f"{base}self_attn.{part}_proj.{kind}"] = chunk
            else:
                out[f"{base}{_LAYER.get(module, module)}.{leaf}"] = value
    return out


def hf_to_openclip_visual(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of openclip_visual_to_hf (how the released unCLIP files store the tower)."""
    top = {hf: openclip for openclip, hf in _TOP.items()}
    layer = {hf: openclip for openclip, hf in _LAYER.items()}
    out: dict[str, Tensor] = {}
    stacked: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
        elif key == "visual_projection.weight":
            out["proj"] = value.t().contiguous()
        elif key.startswith(_HF + "encoder.layers."):
            index, name = key.removeprefix(_HF + "encoder.layers.").split(".", 1)
            module, leaf = name.rsplit(".", 1)
            base = f"transformer.resblocks.{index}."
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                stacked.setdefault(f"{base}attn.in_proj_{leaf}", {})[module[-6]] = value
            else:
                out[f"{base}{layer.get(module, module)}.{leaf}"] = value
    for key, parts in stacked.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def load_unclip_vision(tensors: Mapping[str, Tensor], dtype: torch.dtype,
                       device: torch.device) -> ClipVisionModel:
    """The CLIP vision tower of an unCLIP checkpoint; an error naming the prefix if absent."""
    visual = {key[len(UNCLIP_VISION_PREFIX):]: tensors[key] for key in tensors
              if key.startswith(UNCLIP_VISION_PREFIX)}
    if not visual:
        raise ValueError(f"this checkpoint has no CLIP vision tower ({UNCLIP_VISION_PREFIX}*): "
                         "it is not an unCLIP model; load it with CheckpointLoaderSimple")
    return load_clip_vision(openclip_visual_to_hf(visual), dtype=dtype, device=device)
