"""Mask nodes (ComfyUI's "mask" category): conversions to and from images, solid masks,
inversion, crops, compositing, feathering, growing, thresholds, batches and previews.

MASK values are float tensors [B, H, W] in 0..1; a single [H, W] mask is accepted anywhere."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from engine.context import NodeContext
from engine.dynamic_inputs import Autogrow, GroupedInputsNode
from engine.node import (
    Boolean,
    Combo,
    Float,
    Hidden,
    Input,
    Int,
    Link,
    Node,
    NodeResult,
    NodeSchema,
    Output,
)
from nodes.imageio import preview_prefix, save_png_batch
from nodes.imaging import MAX_RESOLUTION, resize

CHANNELS = ("red", "green", "blue", "alpha")
OPERATIONS = ("multiply", "add", "subtract", "and", "or", "xor")


def _mask_schema(name: str, inputs: tuple[Input, ...], outputs: tuple[Output, ...] | None = None,
                 display_name: str | None = None, **kw: Any) -> NodeSchema:
    return NodeSchema(name, inputs, (Output("MASK"),) if outputs is None else outputs,
                      category="mask", display_name=display_name, comfy_v3=True, **kw)


def _offset(name: str, default: int = 0, low: int = 0) -> Input:
    return Int(name, default, min=low, max=MAX_RESOLUTION, step=1)


def as_batch(mask: torch.Tensor) -> torch.Tensor:
    """Any mask as [B, H, W]."""
    return mask.reshape((-1, mask.shape[-2], mask.shape[-1]))


def mask_to_image(mask: torch.Tensor) -> torch.Tensor:
    """A mask as a grey RGB image [B, H, W, 3]."""
    return as_batch(mask)[..., None].expand(-1, -1, -1, 3)


class MaskToImage(Node):
    schema = _mask_schema("MaskToImage", (Link("mask", "MASK"),), (Output("IMAGE"),),
                          "Convert Mask to Image")

    def execute(self, ctx: NodeContext, mask: torch.Tensor) -> tuple[torch.Tensor]:
        return (mask_to_image(mask),)


class ImageToMask(Node):
    schema = _mask_schema("ImageToMask", (Link("image", "IMAGE"),
                                          Combo("channel", CHANNELS, combo_style="v3")),
                          display_name="Convert Image to Mask")

    def execute(self, ctx: NodeContext, image: torch.Tensor, channel: str) -> tuple[torch.Tensor]:
        index = CHANNELS.index(channel)
        if index >= image.shape[-1]:
            raise ValueError(f"ImageToMask: the image has {image.shape[-1]} channels, so it has "
                             f"no {channel} channel; pick red, green or blue, or give it alpha "
                             f"with JoinImageWithAlpha")
        return (image[..., index],)


def color_mask(image: torch.Tensor, color: int) -> torch.Tensor:
    """1 where a pixel's 8-bit RGB (rounded) equals 0xRRGGBB `color`, else 0."""
    levels = (image[..., :3].clamp(0, 1) * 255.0).round().to(torch.int64)
    packed = (levels[..., 0] << 16) + (levels[..., 1] << 8) + levels[..., 2]
    return (packed == color).to(torch.float32)


class ImageColorToMask(Node):
    schema = _mask_schema("ImageColorToMask", (
        Link("image", "IMAGE"),
        Int("color", 0, min=0, max=0xFFFFFF, step=1, options={"display": "number"})))

    def execute(self, ctx: NodeContext, image: torch.Tensor, color: int) -> tuple[torch.Tensor]:
        return (color_mask(image, color),)


class SolidMask(Node):
    schema = _mask_schema("SolidMask", (Float("value", 1.0, min=0.0, max=1.0, step=0.01),
                                        _offset("width", 512, 1), _offset("height", 512, 1)))

    def execute(self, ctx: NodeContext, value: float, width: int,
                height: int) -> tuple[torch.Tensor]:
        return (torch.full((1, height, width), value, dtype=torch.float32),)


class InvertMask(Node):
    schema = _mask_schema("InvertMask", (Link("mask", "MASK"),))

    def execute(self, ctx: NodeContext, mask: torch.Tensor) -> tuple[torch.Tensor]:
        return (1.0 - mask,)


class CropMask(Node):
    schema = _mask_schema("CropMask", (Link("mask", "MASK"), _offset("x"), _offset("y"),
                                       _offset("width", 512, 1), _offset("height", 512, 1)))

    def execute(self, ctx: NodeContext, mask: torch.Tensor, x: int, y: int, width: int,
                height: int) -> tuple[torch.Tensor]:
        return (as_batch(mask)[:, y:y + height, x:x + width],)


def combine_masks(destination: torch.Tensor, source: torch.Tensor, operation: str
                  ) -> torch.Tensor:
    """ComfyUI's MaskComposite arithmetic; the logic operations act on rounded (0/1) masks."""
    if operation == "multiply":
        return destination * source
    if operation == "add":
        return destination + source
    if operation == "subtract":
        return destination - source
    logic = {"and": torch.logical_and, "or": torch.logical_or, "xor": torch.logical_xor}
    if operation not in logic:
        raise ValueError(f"MaskComposite: unknown operation {operation!r}; use one of "
                         f"{OPERATIONS}")
    return logic[operation](destination.round().bool(), source.round().bool()).float()


class MaskComposite(Node):
    """`source` combined into `destination` at (x, y); the result clamped to 0..1."""

    schema = _mask_schema("MaskComposite", (Link("destination", "MASK"), Link("source", "MASK"),
                                            _offset("x"), _offset("y"),
                                            Combo("operation", OPERATIONS, combo_style="v3")))

    def execute(self, ctx: NodeContext, destination: torch.Tensor, source: torch.Tensor, x: int,
                y: int, operation: str) -> tuple[torch.Tensor]:
        output = as_batch(destination).clone()
        source = as_batch(source)
        rows = min(source.shape[-2], output.shape[-2] - y)
        cols = min(source.shape[-1], output.shape[-1] - x)
        if rows > 0 and cols > 0:
            region = output[:, y:y + rows, x:x + cols]
            output[:, y:y + rows, x:x + cols] = combine_masks(region, source[:, :rows, :cols],
                                                              operation)
        return (output.clamp(0.0, 1.0),)


def feather(mask: torch.Tensor, left: int, top: int, right: int, bottom: int) -> torch.Tensor:
    """Edges faded linearly: the k-th line from a faded side is scaled by (k + 1) / width.

    As in ComfyUI, the right and bottom ramps index from -0: their 1/width step lands on the
    first column (row) and the last one gets 2/width."""
    output = as_batch(mask).clone()
    width, height = output.shape[-1], output.shape[-2]
    left, right, top, bottom = min(left, width), min(right, width), min(top, height), \
        min(bottom, height)
    for index in range(left):
        output[:, :, index] *= (index + 1) / left
    for index in range(right):
        output[:, :, -index] *= (index + 1) / right
    for index in range(top):
        output[:, index, :] *= (index + 1) / top
    for index in range(bottom):
        output[:, -index, :] *= (index + 1) / bottom
    return output


class FeatherMask(Node):
    schema = _mask_schema("FeatherMask", (Link("mask", "MASK"), _offset("left"), _offset("top"),
                                          _offset("right"), _offset("bottom")))

    def execute(self, ctx: NodeContext, mask: torch.Tensor, left: int, top: int, right: int,
                bottom: int) -> tuple[torch.Tensor]:
        return (feather(mask, left, top, right, bottom),)


def grow(mask: torch.Tensor, expand: int, tapered_corners: bool) -> torch.Tensor:
    """Grey dilation (expand > 0) or erosion (< 0) |expand| times with a 3x3 footprint, a
    cross when `tapered_corners` else a square; outside the mask is ignored."""
    values = as_batch(mask)[:, None].float()  # (B, 1, H, W)
    sign = 1.0 if expand >= 0 else -1.0  # erosion is dilation of the negated mask
    values = values * sign
    for _ in range(abs(expand)):
        padded = F.pad(values, (1, 1, 1, 1), value=-torch.inf)
        if tapered_corners:
            shifts = (padded[..., 1:-1, 1:-1], padded[..., :-2, 1:-1], padded[..., 2:, 1:-1],
                      padded[..., 1:-1, :-2], padded[..., 1:-1, 2:])
            values = torch.stack(shifts).amax(dim=0)
        else:
            values = F.max_pool2d(padded, 3, stride=1)
    return (values * sign)[:, 0]


class GrowMask(Node):
    schema = _mask_schema("GrowMask", (Link("mask", "MASK"),
                                       _offset("expand", 0, -MAX_RESOLUTION),
                                       Boolean("tapered_corners", True)),
                          display_name="Grow Mask")

    def execute(self, ctx: NodeContext, mask: torch.Tensor, expand: int,
                tapered_corners: bool) -> tuple[torch.Tensor]:
        return (grow(mask, expand, tapered_corners),)


class ThresholdMask(Node):
    schema = _mask_schema("ThresholdMask", (Link("mask", "MASK"),
                                            Float("value", 0.5, min=0.0, max=1.0, step=0.01)))

    def execute(self, ctx: NodeContext, mask: torch.Tensor, value: float) -> tuple[torch.Tensor]:
        return ((mask > value).float(),)


class MaskPreview(Node):
    """The mask as grey images in the temp folder, for the editor to show."""

    schema = _mask_schema("MaskPreview", (Link("mask", "MASK"), Hidden("prompt", "PROMPT"),
                                          Hidden("extra_pnginfo", "EXTRA_PNGINFO")),
                          (), "Preview Mask", output_node=True)

    def execute(self, ctx: NodeContext, mask: torch.Tensor, prompt: Any = None,
                extra_pnginfo: Any = None) -> NodeResult:
        entries = save_png_batch(mask_to_image(mask), ctx.paths.temp, preview_prefix(), "temp",
                                 1, prompt, extra_pnginfo)
        return NodeResult(ui={"images": entries})


def batch_masks(masks: list[torch.Tensor]) -> torch.Tensor:
    """Masks as one batch; each resized (bilinear, centre crop) to the first one's size."""
    first = as_batch(masks[0])
    height, width = first.shape[-2:]
    resized = [first] + [as_batch(mask) if as_batch(mask).shape[-2:] == (height, width) else
                         resize(as_batch(mask)[:, None], width, height, "bilinear", "center")[:, 0]
                         for mask in masks[1:]]
    return torch.cat(resized, dim=0)


class BatchMasksNode(GroupedInputsNode):
    schema = _mask_schema("BatchMasksNode",
                          (Autogrow("masks", Link("mask", "MASK"), "mask", 2, 50),),
                          display_name="Batch Masks")

    def run(self, ctx: NodeContext, masks: dict[str, torch.Tensor]) -> tuple[torch.Tensor]:
        return (batch_masks(list(masks.values())),)


NODE_TYPES = (MaskToImage, ImageToMask, ImageColorToMask, SolidMask, InvertMask, CropMask,
              MaskComposite, FeatherMask, GrowMask, ThresholdMask, MaskPreview, BatchMasksNode)
