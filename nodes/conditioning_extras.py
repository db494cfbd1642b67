"""Conditioning nodes of ComfyUI's comfy_extras that feed extra model inputs: instruct-pix2pix's
source image (nodes_ip2p) and a ControlNet's own prompt (nodes_cond CLIPTextEncodeControlnet).
T5TokenizerOptions (also nodes_cond) is left out: it configures T5 encoders, which no SD1/SD2/
SDXL model has."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from engine.context import NodeContext
from engine.diffusion.networks.vae_model import VAE
from engine.node import Link, Node, NodeSchema, Output
from engine.values import Latent
from nodes.conditioning import Conditioning, with_values
from nodes.text import _prompt, _require_clip

LATENT_CELL = 8  # pixels per latent cell of the SD VAEs


def crop_to_cells(pixels: Tensor) -> Tensor:
    """An IMAGE (B, H, W, C) centre-cropped to whole latent cells, as ComfyUI crops it."""
    height = (pixels.shape[1] // LATENT_CELL) * LATENT_CELL
    width = (pixels.shape[2] // LATENT_CELL) * LATENT_CELL
    if (height, width) == tuple(pixels.shape[1:3]):
        return pixels
    top = (pixels.shape[1] % LATENT_CELL) // 2
    left = (pixels.shape[2] % LATENT_CELL) // 2
    return pixels[:, top:top + height, left:left + width, :]


class InstructPixToPixConditioning(Node):
    schema = NodeSchema(
        "InstructPixToPixConditioning",
        (Link("positive", "CONDITIONING"), Link("negative", "CONDITIONING"), Link("vae", "VAE"),
         Link("pixels", "IMAGE")),
        (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"),
         Output("LATENT", "latent")),
        category="conditioning/instructpix2pix")

    def execute(self, ctx: NodeContext, positive: Conditioning, negative: Conditioning,
                vae: VAE, pixels: Tensor) -> tuple[Conditioning, Conditioning, Latent]:
        source = vae.encode(crop_to_cells(pixels)[..., :3])
        values = {"concat_latent_image": source}
        return (with_values(positive, values), with_values(negative, values),
                Latent(torch.zeros_like(source)))


class CLIPTextEncodeControlnet(Node):
    schema = NodeSchema(
        "CLIPTextEncodeControlnet",
        (Link("clip", "CLIP"), Link("conditioning", "CONDITIONING"), _prompt("text")),
        (Output("CONDITIONING"),), category="_for_testing/conditioning", experimental=True,
        comfy_v3=True)

    def execute(self, ctx: NodeContext, clip: Any, conditioning: Conditioning,
                text: str) -> tuple[Conditioning]:
        encoded = _require_clip(clip, "CLIPTextEncodeControlnet").encode(text)
        return (with_values(conditioning, {"cross_attn_controlnet": encoded.cond,
                                           "pooled_output_controlnet": encoded.pooled}),)


NODE_TYPES = (InstructPixToPixConditioning, CLIPTextEncodeControlnet)
