"""InstructPixToPixConditioning and CLIPTextEncodeControlnet (nodes/conditioning_extras.py): the
source image reaches an 8-channel UNet's extra channels unscaled, and a ControlNet sees its own
prompt while the UNet keeps the entry's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from engine.values import Latent
from nodes.conditioning_extras import (
    CLIPTextEncodeControlnet,
    InstructPixToPixConditioning,
    crop_to_cells,
)
from tests.diffusion.test_guidance import fake_model, guided, prompt


class HalvingVae:
    """encode: (B, H, W, 3) -> (B, 4, H/8, W/8) of the mean pixel value, to follow the data."""

    def encode(self, pixels: Tensor) -> Tensor:
        batch, height, width, _ = pixels.shape
        return pixels.mean().expand(batch, 4, height // 8, width // 8).clone()


def test_pixels_are_centre_cropped_to_whole_latent_cells() -> None:
    pixels = torch.arange(13 * 10, dtype=torch.float32).view(1, 13, 10, 1).expand(1, 13, 10, 3)
    cropped = crop_to_cells(pixels)
    assert cropped.shape == (1, 8, 8, 3)
    assert torch.equal(cropped, pixels[:, 2:10, 1:9])


def test_ip2p_conditioning_carries_the_source_latent_and_an_empty_latent() -> None:
    pixels = torch.full((1, 16, 24, 3), 0.25)
    positive, negative, latent = InstructPixToPixConditioning().execute(
        None, [prompt(1)], [prompt(3)], HalvingVae(), pixels)
    source = positive[0][1]["concat_latent_image"]
    assert source.shape == (1, 4, 2, 3) and torch.allclose(source, torch.full_like(source, 0.25))
    assert negative[0][1]["concat_latent_image"] is source
    assert isinstance(latent, Latent) and torch.count_nonzero(latent["samples"]) == 0


def test_an_eight_channel_unet_gets_the_unscaled_source_latent_after_the_latent() -> None:
    model, unet = fake_model(in_channels=8)
    source = torch.randn(1, 4, 8, 8)
    guidance = guided(model, [prompt(1, concat_latent_image=source)], [prompt(3)], 2.0)
    guidance(torch.zeros(1, 4, 8, 8), torch.ones(1))
    x = unet.calls[0].x  # uncond first, then cond
    assert x.shape == (2, 8, 8, 8)
    assert torch.equal(x[1, 4:], source[0]) and torch.count_nonzero(x[0, 4:]) == 0


@dataclass(eq=False)
class TokenRecordingControl:
    tokens: list[Tensor] = field(default_factory=list)

    def residuals(self, x_in: Tensor, timestep: Tensor, context: Tensor, y: Any,
                  sigma: Tensor) -> tuple[None, None]:
        self.tokens.append(context)
        return None, None


@dataclass
class Encoded:
    cond: Tensor
    pooled: Tensor


class ConstantClip:
    def encode(self, text: str) -> Encoded:
        return Encoded(torch.full((1, 77, 8), 7.0), torch.ones(1, 32))


def test_a_controlnet_prompt_reaches_the_controlnet_and_not_the_unet() -> None:
    control = TokenRecordingControl()
    (conditioning,) = CLIPTextEncodeControlnet().execute(
        None, ConstantClip(), [prompt(1, control=control)], "a controlnet prompt")
    assert torch.equal(conditioning[0][1]["cross_attn_controlnet"], torch.full((1, 77, 8), 7.0))
    model, unet = fake_model()
    guidance = guided(model, conditioning, None, 1.0)
    guidance(torch.zeros(1, 4, 8, 8), torch.ones(1))
    assert torch.equal(control.tokens[0], torch.full((1, 77, 8), 7.0))
    assert torch.equal(unet.calls[0].context, torch.full((1, 77, 8), 1.0))
