"""Loading single-file checkpoints and standalone UNet/VAE files into the handles nodes use.

Files are opened by state_files.py (safetensors memory-mapped, pickles only when allowed);
modules are built on the meta device and take the file's tensors by assignment, so weights are
not copied unless a dtype cast is needed. Each component reads the file through CastOnRead with
the policy's Holding for it (memory/cast_on_use.py): a weight whose file dtype widens exactly
into the compute dtype stays the file's view and is cast up per layer when it runs; others are
converted one tensor at a time, releasing the file pages of each, so a weight is held once.
Weights go to the policy's offload device (the model manager copies them to the compute device
when used); handles compute on the policy's device."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from engine.diffusion.checkpoints.detect import (
    CheckpointLayout,
    detect_checkpoint,
    detect_unet_file,
)
from engine.diffusion.checkpoints.safetensors_io import CastOnRead, ReadRule, weight_bytes
from engine.diffusion.checkpoints.state_files import CheckpointError, StateFile
from engine.diffusion.checkpoints.text_encoders import load_text_encoder_state
from engine.diffusion.memory.cast_on_use import Holding
from engine.diffusion.memory.devices import DevicePolicy
from engine.diffusion.networks.unet import UNet, UNetConfig, UNetFamily
from engine.diffusion.networks.vae_model import VAE
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.text.encoding import EmbeddingFinder, TextEncoderStack
from engine.diffusion.text.tokenizer import ClipBpe

logger = logging.getLogger("loom.checkpoint")
UNET_CONFIG_KEY = "loom.unet_config"  # safetensors metadata written for non-standard sizes
FAMILY_KEY = "loom.family"
# LATENT values hold the VAE's raw latents, as in ComfyUI (so .latent files and custom nodes
# agree); the model's latent format scales them on the way into and out of sampling.
NODE_LATENT_SCALE = 1.0


def strip_prefix(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors under `prefix`, renamed without it (views, no copies)."""
    return {name[len(prefix):]: tensor for name, tensor in tensors.items()
            if name.startswith(prefix)}


def unet_config_for(layout: CheckpointLayout, metadata: Mapping[str, str]) -> UNetConfig:
    """The UNet's config: recorded in the file (Loom's small test models) or the family's
    released layout (every real checkpoint of these families shares it)."""
    recorded = metadata.get(UNET_CONFIG_KEY)
    if recorded:
        fields = json.loads(recorded)
        return UNetConfig(**{k: tuple(v) if isinstance(v, list) else v
                             for k, v in fields.items()})
    config = UNetConfig.preset(UNetFamily(layout.family), in_channels=layout.in_channels)
    if layout.adm_in_channels != config.adm_in_channels:  # SD 2.1 unCLIP: an image-embedding y
        config = dataclasses.replace(config, adm_in_channels=layout.adm_in_channels)
    return config


def build_unet(weights: Mapping[str, Tensor], config: UNetConfig, holding: Holding,
               device: torch.device, source: str) -> UNet:
    """A UNet holding `weights` (read with `holding`, e.g. through CastOnRead) as they are, in
    eval mode, computing in the holding's compute dtype."""
    with torch.device("meta"):
        unet = UNet(config)
    assign_weights(unet, weights, None, device, source)
    holding.apply(unet)
    return unet


def assign_weights(module: nn.Module, weights: Mapping[str, Tensor], dtype: torch.dtype | None,
                   device: torch.device, source: str) -> None:
    """Give a meta-device module its weights (cast only where `dtype` is given and differs) and
    put it in eval mode without gradients; a name or shape mismatch is an error naming the
    file."""
    prepared = {name: tensor.to(device=device, dtype=dtype) if tensor.is_floating_point()
                else tensor.to(device) for name, tensor in weights.items()}
    missing, unexpected = module.load_state_dict(prepared, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the weights do not fit the detected {type(module).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. "
            f"{unexpected[:3]}); the file may be damaged or of an unsupported variant")
    module.eval().requires_grad_(False)


@dataclass
class LoadedCheckpoint:
    layout: CheckpointLayout
    model: ModelHandle | None
    clip: TextEncoderStack | None
    vae: VAE | None


def checkpoint_weight_bytes(opened: StateFile, policy: DevicePolicy) -> int:
    """Bytes of the UNet, text encoder and VAE weights of a checkpoint once loaded with the
    policy's holdings (what load_checkpoint keeps), from the tensors' shapes and dtypes."""
    layout = detect_checkpoint(opened.tensors)
    rules: dict[str, ReadRule] = {prefix: policy.text_holding
                                  for prefix in layout.text_prefixes.values()}
    rules.update({layout.unet_prefix: policy.unet_holding, layout.vae_prefix: policy.vae_holding})
    present = {prefix: rule for prefix, rule in rules.items() if prefix}  # "": not in it
    return weight_bytes(opened.tensors, present)


def load_checkpoint(opened: StateFile, policy: DevicePolicy, bpe: ClipBpe, *,
                    find_embedding: EmbeddingFinder | None = None, with_clip: bool = True,
                    with_vae: bool = True) -> LoadedCheckpoint:
    """Detect and load every component of a single-file checkpoint."""
    layout = detect_checkpoint(opened.tensors)
    logger.info("%s: %s", opened.path.name, layout.describe())
    model = load_model_from(opened, layout, policy)
    clip = None
    if with_clip and layout.text_prefixes:
        clip = load_text_encoder_state(layout.text_family, opened.tensors, bpe,
                                       find_embedding=find_embedding,
                                       holding=policy.text_holding,
                                       device=policy.offload_device)
    vae = None
    if with_vae and layout.vae_prefix:
        vae = load_vae(CastOnRead(opened.tensors, {layout.vae_prefix: policy.vae_holding}),
                       policy)
    return LoadedCheckpoint(layout, model, clip, vae)


def load_model_from(opened: StateFile, layout: CheckpointLayout, policy: DevicePolicy,
                    storage_dtype: torch.dtype | None = None) -> ModelHandle:
    """The MODEL handle of a checkpoint or standalone UNet file with a detected layout; its
    weights held as the policy's UNet holding says (or in `storage_dtype`, UNETLoader's fp8
    weight dtypes), read from the file straight into that, and cast up to the compute dtype
    layer by layer."""
    prefix = layout.unet_prefix or ""
    holding = policy.unet_holding
    if storage_dtype is not None:
        holding = dataclasses.replace(holding, storage=storage_dtype)
    # Conv kernels stay in the file's layout: relaying them channels_last at load cost 2.7-4.2 s
    # here against 0.4 s, and the steps showed no gain (the notes of 2026-12-07).
    weights = strip_prefix(CastOnRead(opened.tensors, {prefix: holding}), prefix)
    config = unet_config_for(layout, opened.metadata)
    unet = build_unet(weights, config, holding, policy.offload_device, opened.path.name)
    return ModelHandle.create(unet, config, layout.family, layout.prediction, layout.zsnr,
                              name=opened.path.name, device=policy.device,
                              edm_sigmas=layout.edm_sigmas)


def load_unet_file(opened: StateFile, policy: DevicePolicy,
                   storage_dtype: torch.dtype | None = None) -> ModelHandle:
    """UNETLoader: a diffusion-model-only file (LDM names, with or without the prefix)."""
    layout = detect_unet_file(opened.tensors, opened.metadata.get(FAMILY_KEY))
    return load_model_from(opened, layout, policy, storage_dtype)


def load_vae(reader: CastOnRead, policy: DevicePolicy) -> VAE:
    """The VAE of `reader` (a file read with the policy's VAE holding) on the offload device."""
    return VAE.from_state_dict(reader, latent_scale=NODE_LATENT_SCALE, dtype=policy.vae_dtype,
                               device=policy.offload_device,
                               hold_file_dtype=policy.vae_holding.file_dtype)


def load_vae_file(opened: StateFile, policy: DevicePolicy) -> VAE:
    """VAELoader: a standalone VAE file (LDM or diffusers names)."""
    return load_vae(CastOnRead(opened.tensors, {"": policy.vae_holding}), policy)
