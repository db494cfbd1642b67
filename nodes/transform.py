"""Image geometry nodes: flips, quarter turns, stitching two images, resizing to a pixel count
or a longest side, fitting inside a padded frame, the general Resize Image/Mask node, and
reading an image's size. Resizing is ComfyUI's (nodes.imaging.resize)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from engine.context import NodeContext
from engine.dynamic_inputs import ComboOption, DynamicCombo, GroupedInputsNode, MatchType
from engine.node import Boolean, Combo, Float, Hidden, Input, Int, Link, Node, NodeSchema, Output
from nodes.image import pad_channels
from nodes.imaging import (
    CROP_METHODS,
    IMAGE_UPSCALE_METHODS,
    MAX_RESOLUTION,
    resize,
    resize_image,
)

FLIP_METHODS = ("x-axis: vertically", "y-axis: horizontally")
ROTATIONS = ("none", "90 degrees", "180 degrees", "270 degrees")
DIRECTIONS = ("right", "down", "left", "up")
SPACING_COLORS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0),
                  "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}
# ImageScaleToMaxDimension's list, "bilinear" twice, as ComfyUI publishes it.
MAX_DIMENSION_METHODS = ("area", "lanczos", "bilinear", "nearest-exact", "bilinear", "bicubic")


def _image_schema(name: str, inputs: tuple[Input, ...], category: str) -> NodeSchema:
    return NodeSchema(name, (Link("image", "IMAGE"),) + inputs, (Output("IMAGE"),),
                      category=category, comfy_v3=True)


def _size(name: str, default: int = 512, low: int = 0) -> Input:
    return Int(name, default, min=low, max=MAX_RESOLUTION, step=1)


class ImageFlip(Node):
    schema = _image_schema("ImageFlip", (Combo("flip_method", FLIP_METHODS, combo_style="v3"),),
                           "image/transform")

    def execute(self, ctx: NodeContext, image: torch.Tensor,
                flip_method: str) -> tuple[torch.Tensor]:
        return (torch.flip(image, dims=[1 if flip_method.startswith("x") else 2]),)


class ImageRotate(Node):
    """A clockwise quarter-turn rotation."""

    schema = _image_schema("ImageRotate", (Combo("rotation", ROTATIONS, combo_style="v3"),),
                           "image/transform")

    def execute(self, ctx: NodeContext, image: torch.Tensor, rotation: str) -> tuple[torch.Tensor]:
        if rotation not in ROTATIONS:
            raise ValueError(f"ImageRotate: unknown rotation {rotation!r}; use one of {ROTATIONS}")
        # dims (W, H): from the width axis towards the height axis, i.e. clockwise on screen.
        return (torch.rot90(image, k=ROTATIONS.index(rotation), dims=[2, 1]),)


def _repeat_last(images: torch.Tensor, count: int) -> torch.Tensor:
    """The batch padded to `count` images by repeating its last one."""
    missing = count - images.shape[0]
    return images if missing <= 0 else torch.cat([images, images[-1:].repeat(missing, 1, 1, 1)])


def _centre_pad(image: torch.Tensor, size: int, dim: int, value: float) -> torch.Tensor:
    """Pad dimension `dim` (1 = height, 2 = width) to `size`, half before and half after."""
    missing = size - image.shape[dim]
    if missing <= 0:
        return image
    before, after = missing // 2, missing - missing // 2
    pads = (0, 0, before, after) if dim == 2 else (0, 0, 0, 0, before, after)
    return F.pad(image, pads, value=value)


def _spacer(like: torch.Tensor, other: torch.Tensor, width: int, horizontal: bool,
            colour: str) -> torch.Tensor:
    """A band `width` wide (made even) of the spacing colour, opaque when there is alpha."""
    width += width % 2
    batch, channels = like.shape[0], like.shape[-1]
    shape = ((batch, max(like.shape[1], other.shape[1]), width, channels) if horizontal
             else (batch, width, max(like.shape[2], other.shape[2]), channels))
    band = torch.zeros(shape, dtype=like.dtype, device=like.device)
    for index, value in enumerate(SPACING_COLORS[colour][:min(3, channels)]):
        band[..., index] = value
    if channels == 4:
        band[..., 3] = 1.0
    return band


def stitch(image1: torch.Tensor, image2: torch.Tensor, direction: str, match_image_size: bool,
           spacing_width: int, spacing_color: str) -> torch.Tensor:
    """image2 placed beside image1 (ComfyUI's ImageStitch, upstreamed from KJNodes)."""
    count = max(image1.shape[0], image2.shape[0])
    image1, image2 = _repeat_last(image1, count), _repeat_last(image2, count)
    horizontal = direction in ("left", "right")
    if match_image_size:
        aspect = image2.shape[2] / image2.shape[1]
        height, width = ((image1.shape[1], int(image1.shape[1] * aspect)) if horizontal
                         else (int(image1.shape[2] / aspect), image1.shape[2]))
        image2 = resize_image(image2, width, height, "lanczos")
    else:  # align the other dimension by centring on the spacing colour (black if coloured)
        colour = SPACING_COLORS[spacing_color]
        value = colour[0] if len(set(colour)) == 1 else 0.0
        dim = 1 if horizontal else 2
        size = max(image1.shape[dim], image2.shape[dim])
        image1, image2 = _centre_pad(image1, size, dim, value), _centre_pad(image2, size, dim,
                                                                            value)
    channels = max(image1.shape[-1], image2.shape[-1])
    image1, image2 = pad_channels(image1, channels), pad_channels(image2, channels)
    parts = [image2, image1] if direction in ("left", "up") else [image1, image2]
    if spacing_width > 0:
        parts.insert(1, _spacer(image1, image2, spacing_width, horizontal, spacing_color))
    return torch.cat(parts, dim=2 if horizontal else 1)


class ImageStitch(Node):
    """Stitches image2 to image1 in the given direction, optionally with a spacing band."""

    schema = NodeSchema(
        "ImageStitch",
        (Link("image1", "IMAGE"), Combo("direction", DIRECTIONS, default="right", combo_style="v3"),
         Boolean("match_image_size", True), Int("spacing_width", 0, min=0, max=1024, step=2),
         Combo("spacing_color", tuple(SPACING_COLORS), default="white", combo_style="v3"),
         Link("image2", "IMAGE", optional=True)),
        (Output("IMAGE"),), category="image/transform", display_name="Image Stitch",
        comfy_v3=True)

    def execute(self, ctx: NodeContext, image1: torch.Tensor, direction: str,
                match_image_size: bool, spacing_width: int, spacing_color: str,
                image2: torch.Tensor | None = None) -> tuple[torch.Tensor]:
        if image2 is None:
            return (image1,)
        return (stitch(image1, image2, direction, match_image_size, spacing_width,
                       spacing_color),)


class ResizeAndPadImage(Node):
    """Scaled to fit inside target_width x target_height, centred on white or black."""

    schema = _image_schema(
        "ResizeAndPadImage",
        (_size("target_width", low=1), _size("target_height", low=1),
         Combo("padding_color", ("white", "black"), combo_style="v3"),
         Combo("interpolation", ("area", "bicubic", "nearest-exact", "bilinear", "lanczos"),
               combo_style="v3")), "image/transform")

    def execute(self, ctx: NodeContext, image: torch.Tensor, target_width: int,
                target_height: int, padding_color: str, interpolation: str
                ) -> tuple[torch.Tensor]:
        batch, height, width, channels = image.shape
        scale = min(target_width / width, target_height / height)
        new_width, new_height = int(width * scale), int(height * scale)
        resized = resize_image(image, new_width, new_height, interpolation)
        value = 0.0 if padding_color == "black" else 1.0
        frame = torch.full((batch, target_height, target_width, channels), value,
                           dtype=image.dtype, device=image.device)
        top, left = (target_height - new_height) // 2, (target_width - new_width) // 2
        frame[:, top:top + new_height, left:left + new_width] = resized
        return (frame,)


def total_pixels_size(width: int, height: int, megapixels: float, steps: int = 1
                      ) -> tuple[int, int]:
    """The size with about `megapixels` x 2^20 pixels, same aspect, sides multiples of steps."""
    scale = math.sqrt(megapixels * 1024 * 1024 / (width * height))
    return (int(round(width * scale / steps) * steps), int(round(height * scale / steps) * steps))


class ImageScaleToTotalPixels(Node):
    schema = _image_schema(
        "ImageScaleToTotalPixels",
        (Combo("upscale_method", IMAGE_UPSCALE_METHODS, combo_style="v3"),
         Float("megapixels", 1.0, min=0.01, max=16.0, step=0.01),
         Int("resolution_steps", 1, min=1, max=256)), "image/upscaling")

    def execute(self, ctx: NodeContext, image: torch.Tensor, upscale_method: str,
                megapixels: float, resolution_steps: int) -> tuple[torch.Tensor]:
        width, height = total_pixels_size(image.shape[2], image.shape[1], megapixels,
                                          resolution_steps)
        return (resize_image(image, width, height, upscale_method),)


def side_scaled_size(width: int, height: int, size: int, longer: bool) -> tuple[int, int]:
    """(width, height) with the longer (or shorter) side set to `size`, same aspect."""
    if width == height:
        return size, size
    if (height > width) == longer:
        return round(width / height * size), size
    return size, round(height / width * size)


class ImageScaleToMaxDimension(Node):
    schema = _image_schema(
        "ImageScaleToMaxDimension",
        (Combo("upscale_method", MAX_DIMENSION_METHODS, combo_style="v3"),
         _size("largest_size")), "image/upscaling")

    def execute(self, ctx: NodeContext, image: torch.Tensor, upscale_method: str,
                largest_size: int) -> tuple[torch.Tensor]:
        width, height = side_scaled_size(image.shape[2], image.shape[1], largest_size, True)
        return (resize_image(image, width, height, upscale_method),)


class GetImageSize(Node):
    """width, height and batch size of an image."""

    schema = NodeSchema("GetImageSize", (Link("image", "IMAGE"), Hidden("unique_id", "UNIQUE_ID")),
                        (Output("INT", "width"), Output("INT", "height"),
                         Output("INT", "batch_size")),
                        category="image", display_name="Get Image Size", comfy_v3=True)

    def execute(self, ctx: NodeContext, image: torch.Tensor,
                unique_id: str | None = None) -> tuple[int, int, int]:
        width, height, batch_size = image.shape[2], image.shape[1], image.shape[0]
        ctx.show_text(f"width: {width}, height: {height}\n batch size: {batch_size}")
        return width, height, batch_size


_CROP = Combo("crop", CROP_METHODS, default="center", combo_style="v3")
RESIZE_TYPES = (
    ComboOption("scale by multiplier", (Float("multiplier", 1.0, min=0.01, max=8.0, step=0.01),)),
    ComboOption("scale dimensions", (_size("width"), _size("height"), _CROP)),
    ComboOption("scale longer dimension", (_size("longer_size"),)),
    ComboOption("scale shorter dimension", (_size("shorter_size"),)),
    ComboOption("scale width", (_size("width"),)),
    ComboOption("scale height", (_size("height"),)),
    ComboOption("scale total pixels",
                (Float("megapixels", 1.0, min=0.01, max=16.0, step=0.01),)),
    ComboOption("match size", (Link("match", "IMAGE,MASK"), _CROP)),
)


def _target_size(width: int, height: int, resize_type: dict[str, Any]) -> tuple[int, int, str]:
    """(width, height, crop) for a ResizeImageMaskNode choice."""
    kind = resize_type["resize_type"]
    if kind == "scale by multiplier":
        factor = resize_type["multiplier"]
        return round(width * factor), round(height * factor), "disabled"
    if kind in ("scale dimensions", "scale width", "scale height"):
        new_width = resize_type["width"] if kind != "scale height" else 0
        new_height = resize_type["height"] if kind != "scale width" else 0
        if new_width == 0 and new_height == 0:
            return width, height, "keep"
        if new_width == 0:
            new_width = max(1, round(width * new_height / height))
        elif new_height == 0:
            new_height = max(1, round(height * new_width / width))
        return new_width, new_height, resize_type.get("crop", "disabled")
    if kind in ("scale longer dimension", "scale shorter dimension"):
        longer = kind == "scale longer dimension"
        size = resize_type["longer_size" if longer else "shorter_size"]
        return (*side_scaled_size(width, height, size, longer), "disabled")
    if kind == "scale total pixels":
        return (*total_pixels_size(width, height, resize_type["megapixels"]), "disabled")
    if kind == "match size":
        match = resize_type["match"]
        if match.dim() == 4:
            return match.shape[2], match.shape[1], resize_type["crop"]
        return match.shape[-1], match.shape[-2], resize_type["crop"]
    raise ValueError(f"ResizeImageMaskNode: unknown resize_type {kind!r}; use one of "
                     f"{[option.key for option in RESIZE_TYPES]}")


class ResizeImageMaskNode(GroupedInputsNode):
    """An IMAGE or a MASK resized by one of several rules."""

    schema = NodeSchema(
        "ResizeImageMaskNode",
        (MatchType("input", "input_type", "IMAGE,MASK"), DynamicCombo("resize_type", RESIZE_TYPES),
         Combo("scale_method", IMAGE_UPSCALE_METHODS, default="area", combo_style="v3")),
        (Output("COMFY_MATCHTYPE_V3", "resized", match_template="input_type"),),
        category="transform", display_name="Resize Image/Mask", comfy_v3=True)

    def run(self, ctx: NodeContext, input: torch.Tensor, resize_type: dict[str, Any],
            scale_method: str) -> tuple[torch.Tensor]:
        is_image = input.dim() == 4
        planes = input.movedim(-1, 1) if is_image else input.reshape(
            (-1, 1, input.shape[-2], input.shape[-1]))
        width, height, crop = _target_size(planes.shape[-1], planes.shape[-2], resize_type)
        if crop == "keep":
            return (input,)
        resized = resize(planes, width, height, scale_method, crop)
        return (resized.movedim(1, -1) if is_image else resized[:, 0],)


NODE_TYPES = (ImageFlip, ImageRotate, ImageStitch, ResizeAndPadImage, ImageScaleToTotalPixels,
              ImageScaleToMaxDimension, GetImageSize, ResizeImageMaskNode)
