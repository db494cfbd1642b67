"""Shared helpers of the ControlNet tests: diffusers twins on identical weights, random inputs,
files in each layout, and tiny model handles."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.diffusion.checkpoints.controlnet_loader import CONTROL_PREFIX, load_control_model
from engine.diffusion.checkpoints.controlnet_writer import controlnet_config
from engine.diffusion.checkpoints.state_files import open_state_file
from engine.diffusion.checkpoints.writer import randomize
from engine.diffusion.memory.devices import DevicePolicy
from engine.diffusion.networks.controlnet import ControlNet, ControlNetConfig
from engine.diffusion.networks.unet import ADM_NUMBER_DIM, UNet, UNetConfig, sdxl_adm
from engine.diffusion.patches.control import ControlModel
from engine.diffusion.patches.model_handle import ModelHandle

FP32_CPU = DevicePolicy.decide(cpu=True, force_fp32=True)
FAMILY_OF_KIND = {"sd15": "sd1", "sd21v": "sd2", "sdxl_base": "sdxl"}
# SDXL size numbers given to both implementations (diffusers takes them as time_ids, in the
# order original (h, w), crop (top, left), target (h, w)).
SIZES = {"width": 1024, "height": 768, "crop_w": 16, "crop_h": 32, "target_width": 1024,
         "target_height": 768}
TIME_IDS = (768.0, 1024.0, 32.0, 16.0, 768.0, 1024.0)


def tiny_controlnet(kind: str = "sd15", seed: int = 0) -> ControlNet:
    network = ControlNet(controlnet_config(kind))
    randomize(network, torch.Generator().manual_seed(seed))
    return network.eval().requires_grad_(False)


def tiny_model(config: UNetConfig, family: str, seed: int = 3) -> ModelHandle:
    """A MODEL handle over a random tiny UNet."""
    unet = UNet(config)
    randomize(unet, torch.Generator().manual_seed(seed))
    return ModelHandle.create(unet.eval().requires_grad_(False), config, family, name="tiny")


def control_inputs(config: ControlNetConfig, batch: int = 2, height: int = 8, width: int = 8,
                   seed: int = 1) -> dict[str, torch.Tensor | None]:
    """x, hint, timesteps, context and y for both implementations (plus diffusers' `added`)."""
    unet = config.unet
    generator = torch.Generator().manual_seed(seed)
    inputs: dict[str, torch.Tensor | None] = {
        "x": torch.randn(batch, unet.in_channels, height, width, generator=generator),
        "hint": torch.rand(batch, config.hint_channels, height * 8, width * 8,
                           generator=generator),
        "timesteps": torch.tensor([999.0, 1.5, 500.0, 20.0][:batch]),
        "context": torch.randn(batch, 7, unet.context_dim, generator=generator),
        "y": None, "added": None}
    if unet.adm_in_channels is not None:
        pooled = torch.randn(batch, unet.adm_in_channels - 6 * ADM_NUMBER_DIM,
                             generator=generator)
        inputs["y"] = sdxl_adm(pooled, **SIZES)
        inputs["added"] = {"text_embeds": pooled, "time_ids": torch.tensor([TIME_IDS] * batch)}
    return inputs


def run_ours(network: ControlNet, inputs: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
    with torch.no_grad():
        return network(inputs["x"], inputs["hint"], inputs["timesteps"], inputs["context"],
                       inputs["y"])


def diffusers_kwargs(config: ControlNetConfig) -> dict:
    """ControlNetModel kwargs for the same architecture (`attention_head_dim` is a head count
    there; its middle block takes the last level's depth)."""
    unet = config.unet
    widths = [unet.model_channels * mult for mult in unet.channel_mult]
    depths = [depth or unet.transformer_depth_middle for depth in unet.transformer_depth]
    kwargs = {
        "in_channels": unet.in_channels, "conditioning_channels": config.hint_channels,
        "block_out_channels": widths, "layers_per_block": unet.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if depth else "DownBlock2D"
                             for depth in unet.transformer_depth],
        "cross_attention_dim": unet.context_dim,
        "attention_head_dim": unet.num_heads or [w // unet.num_head_channels for w in widths],
        "use_linear_projection": unet.use_linear_in_transformer,
        "transformer_layers_per_block": depths,
        "conditioning_embedding_out_channels": config.hint_widths}
    if unet.adm_in_channels is not None:
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=ADM_NUMBER_DIM,
                      projection_class_embeddings_input_dim=unet.adm_in_channels)
    return kwargs


def diffusers_twin(network: ControlNet) -> torch.nn.Module:
    """diffusers' ControlNetModel holding our weights, converted by diffusers' own single-file
    converter (which leaves SDXL's label_emb out: mapped here to add_embedding)."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    kwargs = diffusers_kwargs(network.config)
    state = network.state_dict()
    converted = convert_controlnet_checkpoint(
        {CONTROL_PREFIX + key: value for key, value in state.items()}, kwargs)
    for linear, index in ((1, 0), (2, 2)):
        for part in ("weight", "bias"):
            if f"label_emb.0.{index}.{part}" in state:
                converted[f"add_embedding.linear_{linear}.{part}"] = \
                    state[f"label_emb.0.{index}.{part}"]
    reference = ControlNetModel(**kwargs)
    reference.load_state_dict(converted, strict=True)
    return reference.eval().requires_grad_(False)


def run_diffusers(reference: torch.nn.Module, inputs: dict
                  ) -> tuple[list[torch.Tensor], torch.Tensor]:
    with torch.no_grad():
        down, mid = reference(inputs["x"], inputs["timesteps"], inputs["context"],
                              inputs["hint"], added_cond_kwargs=inputs["added"],
                              return_dict=False)
    return list(down), mid


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
         ) -> Path:
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path),
              metadata=metadata)
    return path


def load(path: Path, base: ModelHandle | None = None) -> ControlModel:
    return load_control_model(open_state_file(path), FP32_CPU, base)
