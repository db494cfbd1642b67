"""Conditioning for the two image-conditioned SD2-era models: SD_4XUpscale_Conditioning
(ComfyUI's nodes_sdupscale, for the Stable Diffusion x4 upscaler) and LotusConditioning
(nodes_lotus, for Lotus-D depth/normal estimation). What the models make of these values at
sampling time is engine/diffusion/sampling/image_conditioned.py."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from engine.context import NodeContext
from engine.diffusion.sampling.image_conditioned import lotus_null_prompt
from engine.image_ops import resize_center
from engine.node import Float, Link, Node, NodeSchema, Output
from engine.values import Latent
from nodes.conditioning import Conditioning, with_values

X4_FACTOR = 4  # output pixels per latent cell of the x4 upscaler's VAE
X4_LATENT_CHANNELS = 4


class SD_4XUpscale_Conditioning(Node):  # noqa: N801 -- ComfyUI's class name
    schema = NodeSchema(
        "SD_4XUpscale_Conditioning",
        (Link("images", "IMAGE"), Link("positive", "CONDITIONING"),
         Link("negative", "CONDITIONING"),
         Float("scale_ratio", 4.0, min=0.0, max=10.0, step=0.01),
         Float("noise_augmentation", 0.0, min=0.0, max=1.0, step=0.001)),
        (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"),
         Output("LATENT", "latent")),
        category="conditioning/upscale_diffusion", comfy_v3=True,
        python_module="comfy_extras.nodes_sdupscale")

    def execute(self, ctx: NodeContext, images: Tensor, positive: Conditioning,
                negative: Conditioning, scale_ratio: float, noise_augmentation: float
                ) -> tuple[Conditioning, Conditioning, Latent]:
        """The output size is the images' times scale_ratio; the low-res image (pixels in
        -1..1) is resized to a quarter of it, the size of the latent to sample."""
        width = max(1, round(images.shape[2] * scale_ratio))
        height = max(1, round(images.shape[1] * scale_ratio))
        cells_w, cells_h = width // X4_FACTOR, height // X4_FACTOR
        if cells_w == 0 or cells_h == 0:
            raise ValueError(
                f"SD_4XUpscale_Conditioning: scale_ratio {scale_ratio} makes the "
                f"{images.shape[2]}x{images.shape[1]} images {width}x{height} pixels, under the "
                f"{X4_FACTOR} pixels of one latent cell; raise scale_ratio or use larger images")
        pixels = images[..., :3].movedim(-1, 1).float() * 2.0 - 1.0
        pixels = resize_center(pixels, cells_h, cells_w)
        values = {"concat_image": pixels, "noise_augmentation": noise_augmentation}
        latent = torch.zeros((images.shape[0], X4_LATENT_CHANNELS, cells_h, cells_w))
        return with_values(positive, values), with_values(negative, values), Latent(latent)


class LotusConditioning(Node):
    schema = NodeSchema(
        "LotusConditioning", (), (Output("CONDITIONING", "conditioning"),),
        category="conditioning/lotus", comfy_v3=True, python_module="comfy_extras.nodes_lotus")

    def execute(self, ctx: NodeContext, **inputs: Any) -> tuple[Conditioning]:
        """Lotus's fixed null-prompt embedding, the only prompt Lotus-D was trained with."""
        return ([[lotus_null_prompt(), {}]],)


NODE_TYPES = (SD_4XUpscale_Conditioning, LotusConditioning)
