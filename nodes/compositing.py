"""Compositing nodes: pasting an image or latent into another through a mask, the Porter-Duff
operators, and splitting or joining an image's alpha (ComfyUI's masks are 1 - alpha)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.context import NodeContext
from engine.image_ops import repeat_to_batch
from engine.node import Boolean, Combo, Int, Link, Node, NodeSchema, Output
from engine.values import Latent
from nodes.imaging import MAX_RESOLUTION, match_alpha, paste_masked, resize

Operator = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                    tuple[torch.Tensor, torch.Tensor]]
# Porter-Duff on premultiplied colour: (src, src_alpha, dst, dst_alpha) -> (colour, alpha).
PORTER_DUFF: dict[str, Operator] = {
    "ADD": lambda s, sa, d, da: ((s + d).clamp(0, 1), (sa + da).clamp(0, 1)),
    "CLEAR": lambda s, sa, d, da: (torch.zeros_like(d), torch.zeros_like(da)),
    "DARKEN": lambda s, sa, d, da: ((1 - da) * s + (1 - sa) * d + torch.minimum(s, d),
                                    sa + da - sa * da),
    "DST": lambda s, sa, d, da: (d, da),
    "DST_ATOP": lambda s, sa, d, da: (sa * d + (1 - da) * s, sa),
    "DST_IN": lambda s, sa, d, da: (d * sa, sa * da),
    "DST_OUT": lambda s, sa, d, da: ((1 - sa) * d, (1 - sa) * da),
    "DST_OVER": lambda s, sa, d, da: (d + (1 - da) * s, da + (1 - da) * sa),
    "LIGHTEN": lambda s, sa, d, da: ((1 - da) * s + (1 - sa) * d + torch.maximum(s, d),
                                     sa + da - sa * da),
    "MULTIPLY": lambda s, sa, d, da: (s * d, sa * da),
    "OVERLAY": lambda s, sa, d, da: (torch.where(2 * d < da, 2 * s * d,
                                                 sa * da - 2 * (da - s) * (sa - d)),
                                     sa + da - sa * da),
    "SCREEN": lambda s, sa, d, da: (s + d - s * d, sa + da - sa * da),
    "SRC": lambda s, sa, d, da: (s, sa),
    "SRC_ATOP": lambda s, sa, d, da: (da * s + (1 - sa) * d, da),
    "SRC_IN": lambda s, sa, d, da: (s * da, sa * da),
    "SRC_OUT": lambda s, sa, d, da: ((1 - da) * s, (1 - da) * sa),
    "SRC_OVER": lambda s, sa, d, da: (s + (1 - sa) * d, sa + (1 - sa) * da),
    "XOR": lambda s, sa, d, da: ((1 - da) * s + (1 - sa) * d, (1 - da) * sa + (1 - sa) * da),
}


def porter_duff(source: torch.Tensor, source_mask: torch.Tensor, destination: torch.Tensor,
                destination_mask: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Composite [H, W, C] images whose masks [H, W, 1] are 1 - alpha; returns the image
    (un-premultiplied, 0 where transparent) and its mask."""
    source_alpha, destination_alpha = 1 - source_mask, 1 - destination_mask
    colour, alpha = PORTER_DUFF[mode](source * source_alpha, source_alpha,
                                      destination * destination_alpha, destination_alpha)
    colour = torch.where(alpha > 1e-5, colour / alpha, torch.zeros_like(colour)).clamp(0, 1)
    return colour, 1 - alpha


def _fit(values: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[H', W', C] resized to [height, width, C] (bicubic, centre crop), as ComfyUI does."""
    if values.shape[:2] == (height, width):
        return values
    return resize(values.movedim(-1, 0)[None], width, height, "bicubic", "center")[0] \
        .movedim(0, -1)


class PorterDuffImageComposite(Node):
    schema = NodeSchema(
        "PorterDuffImageComposite",
        (Link("source", "IMAGE"), Link("source_alpha", "MASK"), Link("destination", "IMAGE"),
         Link("destination_alpha", "MASK"),
         Combo("mode", tuple(PORTER_DUFF), default="DST", combo_style="v3")),
        (Output("IMAGE"), Output("MASK")), category="mask/compositing",
        display_name="Porter-Duff Image Composite", comfy_v3=True)

    def execute(self, ctx: NodeContext, source: torch.Tensor, source_alpha: torch.Tensor,
                destination: torch.Tensor, destination_alpha: torch.Tensor,
                mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        if mode not in PORTER_DUFF:
            raise ValueError(f"PorterDuffImageComposite: unknown mode {mode!r}; use one of "
                             f"{tuple(PORTER_DUFF)}")
        if source.shape[-1] != destination.shape[-1]:
            raise ValueError(f"PorterDuffImageComposite: source has {source.shape[-1]} channels "
                             f"and destination {destination.shape[-1]}; give both the same")
        count = min(len(source), len(source_alpha), len(destination), len(destination_alpha))
        images, masks = [], []
        for index in range(count):
            height, width = destination.shape[1:3]
            dst_mask = _fit(destination_alpha[index][..., None], height, width)
            src = _fit(source[index], height, width)
            src_mask = _fit(source_alpha[index][..., None], *dst_mask.shape[:2])
            image, mask = porter_duff(src, src_mask, destination[index], dst_mask, mode)
            images.append(image)
            masks.append(mask[..., 0])
        return torch.stack(images), torch.stack(masks)


class SplitImageWithAlpha(Node):
    schema = NodeSchema("SplitImageWithAlpha", (Link("image", "IMAGE"),),
                        (Output("IMAGE"), Output("MASK")), category="mask/compositing",
                        display_name="Split Image with Alpha", comfy_v3=True)

    def execute(self, ctx: NodeContext, image: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = image[..., 3] if image.shape[-1] > 3 else torch.ones_like(image[..., 0])
        return image[..., :3], 1.0 - alpha


class JoinImageWithAlpha(Node):
    schema = NodeSchema("JoinImageWithAlpha", (Link("image", "IMAGE"), Link("alpha", "MASK")),
                        (Output("IMAGE"),), category="mask/compositing",
                        display_name="Join Image with Alpha", comfy_v3=True)

    def execute(self, ctx: NodeContext, image: torch.Tensor,
                alpha: torch.Tensor) -> tuple[torch.Tensor]:
        count = max(len(image), len(alpha))
        image = repeat_to_batch(image, count)
        mask = alpha.reshape((-1, 1, alpha.shape[-2], alpha.shape[-1]))
        mask = torch.nn.functional.interpolate(mask, size=tuple(image.shape[1:3]),
                                               mode="bilinear")
        mask = repeat_to_batch(mask, count)[:, 0]
        return (torch.cat((image[..., :3], (1.0 - mask)[..., None]), dim=-1),)


def _paste_inputs(step: int) -> tuple:
    offsets = tuple(Int(name, 0, min=0, max=MAX_RESOLUTION, step=step) for name in ("x", "y"))
    return offsets + (Boolean("resize_source", False), Link("mask", "MASK", optional=True))


class ImageCompositeMasked(Node):
    """`source` pasted into `destination` at (x, y) through an optional mask."""

    schema = NodeSchema("ImageCompositeMasked",
                        (Link("destination", "IMAGE"), Link("source", "IMAGE"))
                        + _paste_inputs(1), (Output("IMAGE"),), category="image", comfy_v3=True)

    def execute(self, ctx: NodeContext, destination: torch.Tensor, source: torch.Tensor, x: int,
                y: int, resize_source: bool, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor]:
        destination, source = match_alpha(destination, source)
        pasted = paste_masked(destination.movedim(-1, 1), source.movedim(-1, 1), x, y, mask, 1,
                              resize_source)
        return (pasted.movedim(1, -1),)


class LatentCompositeMasked(Node):
    """`source` latents pasted into `destination` at pixel (x, y) (a multiple of 8)."""

    schema = NodeSchema("LatentCompositeMasked",
                        (Link("destination", "LATENT"), Link("source", "LATENT"))
                        + _paste_inputs(8), (Output("LATENT"),), category="latent",
                        comfy_v3=True)

    def execute(self, ctx: NodeContext, destination: Latent, source: Latent, x: int, y: int,
                resize_source: bool, mask: torch.Tensor | None = None) -> tuple[Latent]:
        target = Latent.of(destination)
        pasted = paste_masked(target.samples, Latent.of(source).samples, x, y, mask, 8,
                              resize_source)
        return (target.replace(samples=pasted),)


NODE_TYPES = (PorterDuffImageComposite, SplitImageWithAlpha, JoinImageWithAlpha,
              ImageCompositeMasked, LatentCompositeMasked)
