"""Writing a MODEL, CLIP and VAE back as one single-file checkpoint in the original layout
(`model.diffusion_model.*`, the text encoders under their checkpoint prefixes,
`first_stage_model.*`), with every patch (LoRA, merges) baked into the weights.

The file loads back through the ordinary checkpoint loader: v-prediction models carry the
`v_pred` marker key (and `ztsnr` for zero-terminal-SNR schedules), and UNets of non-released
sizes (Loom's test models) record their config in the metadata."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from engine.diffusion.checkpoints.detect import TEXT_FAMILY, UNET_PREFIX, VAE_PREFIX
from engine.diffusion.checkpoints.loader import FAMILY_KEY, UNET_CONFIG_KEY
from engine.diffusion.checkpoints.text_encoders import CHECKPOINT_PREFIXES, hf_text_encoder_state
from engine.diffusion.networks.model_sampling import model_sampling
from engine.diffusion.networks.unet import UNetConfig, UNetFamily
from engine.diffusion.networks.vae_model import VAE
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.patches.patching import patched
from engine.diffusion.text.encoding import TextEncoderStack


def _module_tensors(module: nn.Module, prefix: str) -> dict[str, Tensor]:
    """The module's state under `prefix`, on the CPU and contiguous (as safetensors wants)."""
    return {prefix + name: tensor.detach().to("cpu").contiguous()
            for name, tensor in module.state_dict().items()}


def _markers(model: ModelHandle) -> dict[str, Tensor]:
    """Marker keys the loader reads the prediction type from."""
    sampling = model.sampling
    if sampling.prediction != "v_prediction":
        return {}
    markers = {"v_pred": torch.tensor([])}
    if torch.equal(sampling.sigmas, model_sampling("v_prediction", zsnr=True).sigmas):
        markers["ztsnr"] = torch.tensor([])
    return markers


def checkpoint_metadata(model: ModelHandle, extra: Mapping[str, str]) -> dict[str, str]:
    """`extra` (prompt, workflow) plus the family and, for non-released sizes, the UNet config."""
    metadata = dict(extra)
    metadata[FAMILY_KEY] = model.family
    released = UNetConfig.preset(UNetFamily(model.family), in_channels=model.config.in_channels)
    if model.config != released:
        metadata[UNET_CONFIG_KEY] = json.dumps(dataclasses.asdict(model.config))
    return metadata


def save_checkpoint(path: Path, model: ModelHandle, clip: TextEncoderStack | None,
                    vae: VAE | None, extra_metadata: Mapping[str, str]) -> Path:
    """Write the parts given, patches applied, as one .safetensors checkpoint at `path`
    (ModelSave passes the model alone: `model.diffusion_model.*` keys, as ComfyUI's)."""
    if clip is not None and clip.family != TEXT_FAMILY.get(model.family, model.family):
        raise ValueError(f"the CLIP is a {clip.family} text encoder but the model is "
                         f"{model.family}; connect the CLIP that belongs to this model")
    path.parent.mkdir(parents=True, exist_ok=True)
    clip_parts = clip.encoders.items() if clip is not None else ()
    with ExitStack() as stack:  # tensors are read and written while the patches hold
        stack.enter_context(patched(model.unet, model.patches))
        tensors = _module_tensors(model.unet, UNET_PREFIX)
        for name, encoder in clip_parts:
            assert clip is not None
            stack.enter_context(patched(encoder, clip.patches.get(name, ())))
            tensors.update(_module_tensors(encoder, CHECKPOINT_PREFIXES[(clip.family, name)][0]))
        if vae is not None:
            tensors.update(_module_tensors(vae.module, VAE_PREFIX))
        tensors.update(_markers(model))
        save_file(tensors, str(path), metadata=checkpoint_metadata(model, extra_metadata))
    return path


def save_vae(path: Path, vae: VAE, metadata: Mapping[str, str]) -> Path:
    """VAESave: the VAE's weights in LDM naming (encoder.*, decoder.*, quant_conv ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_module_tensors(vae.module, ""), str(path), metadata=dict(metadata))
    return path


def save_text_encoders(path_for: Callable[[str], Path], clip: TextEncoderStack,
                       metadata: Mapping[str, str]) -> list[Path]:
    """CLIPSave: one file per encoder, named by `path_for("clip_l" | "clip_g" | "clip_h")`, in
    HF CLIPTextModel(WithProjection) naming (`text_model.*`, `text_projection.weight`), as
    ComfyUI writes them; patches (LoRA, merges) applied. CLIPLoader reads them back."""
    written = []
    for name, encoder in clip.encoders.items():
        with patched(encoder, clip.patches.get(name, ())):
            state = {key: value.detach().to("cpu").contiguous()
                     for key, value in hf_text_encoder_state(encoder).items()}
        path = path_for(f"clip_{name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path), metadata=dict(metadata))
        written.append(path)
    return written
