"""A diffusers model folder (DiffusersLoader): `unet/`, `vae/` and `text_encoder/` and/or
`text_encoder_2/`, each with a config.json and weights in diffusers/HF naming -> Loom's MODEL,
CLIP and VAE.

Which file of a component is read follows ComfyUI: the fp16 safetensors first, then the full
safetensors, then the .bin pickles (only with --allow-pickle-checkpoints). The family follows
from the text encoders present: `text_encoder` + `text_encoder_2` is SDXL, `text_encoder_2`
alone the SDXL refiner, one `text_encoder` with QuickGELU (OpenAI CLIP-L) SD1, with GELU
(OpenCLIP ViT-H in HF naming) SD2. The prediction type is read from the weights as for
single-file checkpoints (ComfyUI does not read the scheduler config either). An SD2 text
encoder saved without `text_projection` gets the identity, as ComfyUI does (SD2 does not use
the projected pooled output)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from engine.diffusion.checkpoints.detect import detect_prediction
from engine.diffusion.checkpoints.diffusers_unet import (
    diffusers_unet_to_ldm,
    unet_config_from_diffusers,
)
from engine.diffusion.checkpoints.loader import build_unet, load_vae
from engine.diffusion.checkpoints.safetensors_io import CastOnRead
from engine.diffusion.checkpoints.state_files import CheckpointError, open_state_file
from engine.diffusion.checkpoints.text_encoders import build_text_encoder, standalone_encoder_state
from engine.diffusion.memory.devices import DevicePolicy
from engine.diffusion.networks.clip_text import TextEncoderConfig
from engine.diffusion.networks.vae_model import VAE
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.text.encoding import EmbeddingFinder, TextEncoderStack, family_spec
from engine.diffusion.text.tokenizer import ClipBpe

logger = logging.getLogger("loom.checkpoint")
MODEL_FILES = ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors",
               "diffusion_pytorch_model.fp16.bin", "diffusion_pytorch_model.bin")
TEXT_FILES = ("model.fp16.safetensors", "model.safetensors", "pytorch_model.fp16.bin",
              "pytorch_model.bin")
TEXT_FOLDERS = ("text_encoder", "text_encoder_2")


def weight_file(folder: Path, component: str, names: tuple[str, ...]) -> Path:
    """The component's weights file, in ComfyUI's order of preference."""
    for name in names:
        if (folder / component / name).is_file():
            return folder / component / name
    raise CheckpointError(f"{folder.name}: no {component} weights ({' or '.join(names[:2])}) in "
                          f"{folder / component}; the diffusers folder is incomplete")


def read_config(folder: Path, component: str) -> dict[str, Any]:
    path = folder / component / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder.name}: cannot read {path} ({exc}); a diffusers folder "
                              "has a config.json next to each component's weights") from exc


def weight_files(folder: Path) -> list[Path]:
    """Every weights file the folder's components would be read from (fingerprints)."""
    found = [folder / "model_index.json"]
    for component in ("unet", "vae", *TEXT_FOLDERS):
        if (folder / component).is_dir():
            names = TEXT_FILES if component in TEXT_FOLDERS else MODEL_FILES
            found.append(weight_file(folder, component, names))
    return found


def folder_family(folder: Path) -> str:
    present = [name for name in TEXT_FOLDERS if (folder / name).is_dir()]
    if present == list(TEXT_FOLDERS):
        return "sdxl"
    if present == ["text_encoder_2"]:
        return "sdxl_refiner"
    if present == ["text_encoder"]:
        act = read_config(folder, "text_encoder").get("hidden_act", "quick_gelu")
        return "sd1" if act == "quick_gelu" else "sd2"
    raise CheckpointError(f"{folder.name}: no text_encoder/ or text_encoder_2/ folder; "
                          "DiffusersLoader needs the text encoders of an SD1/SD2/SDXL folder")


def load_diffusers_folder(folder: Path, policy: DevicePolicy, bpe: ClipBpe, *,
                          find_embedding: EmbeddingFinder | None = None,
                          allow_pickle: bool = False) -> tuple[ModelHandle, TextEncoderStack, VAE]:
    """(MODEL, CLIP, VAE) of a diffusers folder (module docstring)."""
    family = folder_family(folder)
    model = _load_unet(folder, family, policy, allow_pickle)
    clip = _load_text_encoders(folder, family, policy, bpe, find_embedding, allow_pickle)
    vae_tensors = open_state_file(weight_file(folder, "vae", MODEL_FILES),
                                  allow_pickle=allow_pickle).tensors
    vae = load_vae(CastOnRead(vae_tensors, {"": policy.vae_holding}), policy)
    return model, clip, vae


def _load_unet(folder: Path, family: str, policy: DevicePolicy, allow_pickle: bool
               ) -> ModelHandle:
    path = weight_file(folder, "unet", MODEL_FILES)
    config = unet_config_from_diffusers(read_config(folder, "unet"), folder.name)
    tensors = open_state_file(path, allow_pickle=allow_pickle).tensors
    # read as a checkpoint's UNet is: in the held dtype (loader.py)
    weights = diffusers_unet_to_ldm(CastOnRead(tensors, {"": policy.unet_holding}),
                                    config, f"{folder.name}/unet")
    prediction, zsnr = detect_prediction(weights, family, config.in_channels, "")
    unet = build_unet(weights, config, policy.unet_holding, policy.offload_device,
                      f"{folder.name}/unet")
    logger.info("%s: diffusers %s UNet, %s-prediction", folder.name, family, prediction)
    return ModelHandle.create(unet, config, family, prediction, zsnr, name=folder.name,
                              device=policy.device)


def text_encoder_config(config: Mapping[str, Any], architecture: str) -> TextEncoderConfig:
    """Loom's TextEncoderConfig from a transformers CLIPTextConfig."""
    width = int(config["hidden_size"])
    projection = None if architecture == "clip_l" else int(config.get("projection_dim") or width)
    return TextEncoderConfig(
        width=width, layers=int(config["num_hidden_layers"]),
        heads=int(config["num_attention_heads"]), mlp_width=int(config["intermediate_size"]),
        activation=str(config.get("hidden_act", "quick_gelu")), projection_dim=projection,
        vocab_size=int(config.get("vocab_size", 49408)),
        context_length=int(config.get("max_position_embeddings", 77)),
        norm_eps=float(config.get("layer_norm_eps", 1e-5)))


def _load_text_encoders(folder: Path, family: str, policy: DevicePolicy, bpe: ClipBpe,
                        find_embedding: EmbeddingFinder | None, allow_pickle: bool
                        ) -> TextEncoderStack:
    specs = family_spec(family).encoders
    subfolders = TEXT_FOLDERS if family == "sdxl" else \
        ("text_encoder_2",) if family == "sdxl_refiner" else ("text_encoder",)
    encoders: dict[str, nn.Module] = {}
    for spec, subfolder in zip(specs, subfolders, strict=True):
        config = text_encoder_config(read_config(folder, subfolder), spec.architecture)
        tensors = open_state_file(weight_file(folder, subfolder, TEXT_FILES),
                                  allow_pickle=allow_pickle).tensors
        state = _with_projection(tensors, spec.architecture, config)
        encoders[spec.name] = build_text_encoder(
            spec.architecture, standalone_encoder_state(state, spec.architecture),
            holding=policy.text_holding, device=policy.offload_device, config=config)
    return TextEncoderStack(family, encoders, bpe, find_embedding=find_embedding)


def _with_projection(tensors: Mapping[str, Tensor], architecture: str,
                     config: TextEncoderConfig) -> Mapping[str, Tensor]:
    """An OpenCLIP tower saved as a plain HF CLIPTextModel gets an identity projection."""
    if architecture == "clip_l" or "text_projection.weight" in tensors:
        return tensors
    return {**tensors, "text_projection.weight": torch.eye(config.projection_dim or config.width,
                                                           config.width)}
