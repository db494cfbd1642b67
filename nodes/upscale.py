"""Model upscaling: UpscaleModelLoader reads any single-image model spandrel detects (ESRGAN /
Real-ESRGAN, SwinIR, HAT, DAT, OmniSR, SPAN, Compact ...) from models/upscale_models;
ImageUpscaleWithModel runs it over an IMAGE in overlapping tiles, as ComfyUI does.

Upscale models are often .pth files: like every pickle they load only with
--allow-pickle-checkpoints, through torch.load(weights_only=True)
(engine.diffusion.checkpoints.addon_files.read_upscale_state); .safetensors always load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.context import NodeContext
from engine.diffusion.checkpoints.addon_files import read_upscale_state
from engine.diffusion.memory.model_manager import ModelManager
from engine.diffusion.memory.offload import compute_device
from engine.diffusion.networks.tiling import tiled_apply
from engine.diffusion.networks.upscalers import UpscaleNet, build_upscaler
from engine.node import Combo, FilesIn, Link, Node, NodeSchema, Output
from nodes.loaders import file_fingerprint, load_model_file, manager

TILE = 512  # ComfyUI's first tile size, in input pixels
OVERLAP = 32
MIN_TILE = 128  # below this, running out of memory is reported instead of retried


@dataclass(frozen=True)
class UpscaleModel:
    """An UPSCALE_MODEL value: the network (spandrel's), its integer scale and the dtype it
    runs in. `module` is what the model manager places on the compute device."""

    net: UpscaleNet
    scale: int
    dtype: torch.dtype
    name: str

    @property
    def module(self) -> torch.nn.Module:
        return self.net.module


def load_upscale_model(ctx: NodeContext, model_name: str) -> UpscaleModel:
    """The named model, shared through the model manager; weights in fp32 on the policy's device."""
    dtype = torch.float32

    def build(models: ModelManager, path: Path) -> UpscaleModel:
        state = read_upscale_state(path, allow_pickle=models.allow_pickle)
        net = build_upscaler(state, path.name, dtype, models.policy.offload_device)
        return UpscaleModel(net, net.scale, dtype, path.name)

    return load_model_file(ctx, "upscale_models", model_name, "upscale_model", build,
                           manager(ctx).policy.device, dtype)


def upscale_pixels(model: UpscaleModel, pixels: torch.Tensor, tile: int, overlap: int,
                   progress: Any = None) -> torch.Tensor:
    """`pixels` [B, C, H, W] upscaled tile by tile; the tile size as given, no retries."""
    device = compute_device(model.module)

    def run_tile(window: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model.net(window.to(device, model.dtype)).float()

    return tiled_apply(run_tile, pixels, tile=tile, overlap=overlap, scale=model.scale,
                       out_channels=model.net.out_channels, progress=progress)


def upscale_image(ctx: NodeContext, model: UpscaleModel, image: torch.Tensor,
                  tile: int = TILE, overlap: int = OVERLAP) -> torch.Tensor:
    """An IMAGE [B, H, W, C] upscaled by the model, clamped to 0..1; on running out of memory
    the tile is halved and the image started again (ComfyUI's behaviour)."""
    _check_channels(model, image)
    pixels = image.movedim(-1, 1).float()  # (B, C, H, W)
    while True:
        try:
            out = upscale_pixels(model, pixels, tile, overlap, ctx.progress)
            return out.clamp(0.0, 1.0).movedim(1, -1).cpu().contiguous()
        except torch.OutOfMemoryError:
            if tile // 2 < MIN_TILE:
                raise
            tile //= 2


def _check_channels(model: UpscaleModel, image: torch.Tensor) -> None:
    channels = model.net.in_channels
    if image.ndim != 4 or image.shape[-1] != channels:
        raise ValueError(f"upscale model {model.name} takes [B, H, W, {channels}] images, got "
                         f"shape {tuple(image.shape)}; convert the image to {channels} "
                         f"channels first")


class UpscaleModelLoader(Node):
    schema = NodeSchema(
        "UpscaleModelLoader",
        (Combo("model_name", FilesIn("upscale_models"), combo_style="v3"),),
        (Output("UPSCALE_MODEL"),), category="loaders", display_name="Load Upscale Model",
        description="Loads an upscale model of any architecture spandrel detects: ESRGAN, "
                    "Real-ESRGAN, SwinIR, HAT, DAT, OmniSR, SPAN, Compact and more.")

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        return file_fingerprint(ctx, "upscale_models", inputs["model_name"])

    def execute(self, ctx: NodeContext, model_name: str) -> tuple[UpscaleModel]:
        return (load_upscale_model(ctx, model_name),)


class ImageUpscaleWithModel(Node):
    schema = NodeSchema(
        "ImageUpscaleWithModel",
        (Link("upscale_model", "UPSCALE_MODEL"), Link("image", "IMAGE")),
        (Output("IMAGE"),), category="image/upscaling",
        display_name="Upscale Image (using Model)")

    def execute(self, ctx: NodeContext, upscale_model: UpscaleModel,
                image: torch.Tensor) -> tuple[torch.Tensor]:
        return (upscale_image(ctx, upscale_model, image),)


NODE_TYPES = (UpscaleModelLoader, ImageUpscaleWithModel)
