"""Inpainting nodes: VAEEncodeForInpaint (grey out the masked pixels, encode, attach a grown
noise mask) and InpaintModelConditioning (the inputs of 9-channel inpainting models).

Masks follow ComfyUI: resized bilinearly to the image, rounded to 0/1 before greying, pixels
under the mask set to 0.5 grey; images whose sides are not multiples of 8 are centre-cropped."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.context import NodeContext
from engine.diffusion.networks.vae_model import VAE
from engine.node import Boolean, Int, Link, Node, NodeSchema, Output
from engine.values import Latent
from nodes.conditioning import Conditioning, with_values

LATENT_CELL = 8  # InpaintModelConditioning crops to this multiple whatever the VAE


def pixel_mask(mask: Tensor, pixels: Tensor) -> Tensor:
    """A MASK as (B, 1, H, W) at the image's size (bilinear)."""
    mask = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).to(torch.float32)
    return F.interpolate(mask, size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")


def crop_to_cells(pixels: Tensor, mask: Tensor, cell: int) -> tuple[Tensor, Tensor]:
    """Image [B, H, W, C] and mask [B, 1, H, W] centre-cropped to multiples of `cell`."""
    height, width = pixels.shape[1] // cell * cell, pixels.shape[2] // cell * cell
    if (height, width) == tuple(pixels.shape[1:3]):
        return pixels, mask
    top, left = (pixels.shape[1] % cell) // 2, (pixels.shape[2] % cell) // 2
    return (pixels[:, top:top + height, left:left + width, :],
            mask[:, :, top:top + height, left:left + width])


def grey_masked(pixels: Tensor, mask: Tensor) -> Tensor:
    """A copy of the RGB image with pixels under the (rounded) mask set to 0.5 grey."""
    keep = (1.0 - mask.round()).squeeze(1)  # (B, H, W)
    rgb = pixels[..., :3].clone()
    for channel in range(3):
        rgb[..., channel] = (rgb[..., channel] - 0.5) * keep + 0.5
    return rgb


def grow_mask(mask: Tensor, grow_by: int) -> Tensor:
    """The rounded mask dilated by a grow_by x grow_by box (so seams fall inside it)."""
    if grow_by == 0:
        return mask
    kernel = torch.ones((1, 1, grow_by, grow_by), dtype=mask.dtype)
    padding = math.ceil((grow_by - 1) / 2)
    return torch.clamp(F.conv2d(mask.round(), kernel, padding=padding), 0, 1)


def _require_vae(vae: Any, node: str) -> VAE:
    if not isinstance(vae, VAE):
        raise TypeError(f"{node}: the vae input must be a VAE (from a checkpoint or VAELoader), "
                        f"got {type(vae).__name__}")
    return vae


class VAEEncodeForInpaint(Node):
    schema = NodeSchema(
        "VAEEncodeForInpaint",
        (Link("pixels", "IMAGE"), Link("vae", "VAE"), Link("mask", "MASK"),
         Int("grow_mask_by", 6, min=0, max=64, step=1)),
        (Output("LATENT"),), category="latent/inpaint", display_name="VAE Encode (for Inpainting)")

    def execute(self, ctx: NodeContext, pixels: Tensor, vae: VAE, mask: Tensor,
                grow_mask_by: int) -> tuple[Latent]:
        vae = _require_vae(vae, "VAEEncodeForInpaint")
        mask = pixel_mask(mask, pixels)
        pixels, mask = crop_to_cells(pixels, mask, vae.downscale)
        grown = grow_mask(mask, grow_mask_by)
        height, width = pixels.shape[1], pixels.shape[2]
        latent = vae.encode(grey_masked(pixels, mask))
        return (Latent(latent, noise_mask=grown[:, :, :height, :width].round()),)


class InpaintModelConditioning(Node):
    schema = NodeSchema(
        "InpaintModelConditioning",
        (Link("positive", "CONDITIONING"), Link("negative", "CONDITIONING"), Link("vae", "VAE"),
         Link("pixels", "IMAGE"), Link("mask", "MASK"), Boolean("noise_mask", True)),
        (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"),
         Output("LATENT", "latent")),
        category="conditioning/inpaint")

    def execute(self, ctx: NodeContext, positive: Conditioning, negative: Conditioning,
                vae: VAE, pixels: Tensor, mask: Tensor,
                noise_mask: bool) -> tuple[Conditioning, Conditioning, Latent]:
        """Conditioning carrying the masked image's latent and the mask, and the image latent."""
        vae = _require_vae(vae, "InpaintModelConditioning")
        mask = pixel_mask(mask, pixels)
        cropped, mask = crop_to_cells(pixels, mask, LATENT_CELL)
        concat_latent = vae.encode(grey_masked(cropped, mask))
        latent = Latent(vae.encode(pixels), noise_mask=mask if noise_mask else None)
        values = {"concat_latent_image": concat_latent, "concat_mask": mask}
        return with_values(positive, values), with_values(negative, values), latent


NODE_TYPES = (VAEEncodeForInpaint, InpaintModelConditioning)
