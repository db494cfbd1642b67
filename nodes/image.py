"""Pixel-space image nodes: scale, invert, batch, crop, solid colour and outpaint padding.
IMAGE values are float tensors [B, H, W, C] in 0..1; MASK values [B, H, W]."""

from __future__ import annotations

import torch

from engine.context import NodeContext
from engine.node import Combo, Float, Input, Int, Link, Node, NodeSchema, Output
from nodes.imaging import CROP_METHODS, IMAGE_UPSCALE_METHODS, MAX_RESOLUTION, resize_image


def _size(name: str, default: int = 512, low: int = 1, step: int = 1) -> Input:
    """A pixel width/height/offset widget up to MAX_RESOLUTION."""
    return Int(name, default, min=low, max=MAX_RESOLUTION, step=step)


def scaled_size(old_width: int, old_height: int, width: int, height: int) -> tuple[int, int]:
    """Target size where a 0 width or height follows the other one's aspect ratio."""
    if width == 0:
        width = max(1, round(old_width * height / old_height))
    elif height == 0:
        height = max(1, round(old_height * width / old_width))
    return width, height


class ImageScale(Node):
    """Resize images to a width and height (0 keeps the aspect ratio from the other side)."""

    schema = NodeSchema(
        name="ImageScale", display_name="Upscale Image", category="image/upscaling",
        inputs=(Link("image", "IMAGE"), Combo("upscale_method", IMAGE_UPSCALE_METHODS),
                _size("width", low=0), _size("height", low=0), Combo("crop", CROP_METHODS)),
        outputs=(Output("IMAGE"),))

    def execute(self, ctx: NodeContext, image: torch.Tensor, upscale_method: str, width: int,
                height: int, crop: str) -> tuple[torch.Tensor]:
        if width == 0 and height == 0:
            return (image,)
        width, height = scaled_size(image.shape[2], image.shape[1], width, height)
        return (resize_image(image, width, height, upscale_method, crop),)


class ImageScaleBy(Node):
    """Resize images by a factor."""

    schema = NodeSchema(
        name="ImageScaleBy", display_name="Upscale Image By", category="image/upscaling",
        inputs=(Link("image", "IMAGE"), Combo("upscale_method", IMAGE_UPSCALE_METHODS),
                Float("scale_by", 1.0, min=0.01, max=8.0, step=0.01)),
        outputs=(Output("IMAGE"),))

    def execute(self, ctx: NodeContext, image: torch.Tensor, upscale_method: str,
                scale_by: float) -> tuple[torch.Tensor]:
        width = max(1, round(image.shape[2] * scale_by))
        height = max(1, round(image.shape[1] * scale_by))
        return (resize_image(image, width, height, upscale_method),)


class ImageInvert(Node):
    """1 - every pixel value."""

    schema = NodeSchema(name="ImageInvert", display_name="Invert Image", category="image",
                        inputs=(Link("image", "IMAGE"),), outputs=(Output("IMAGE"),))

    def execute(self, ctx: NodeContext, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (1.0 - image,)


def pad_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """Add opaque (1.0) channels up to `channels` (RGB -> RGBA)."""
    missing = channels - image.shape[-1]
    return torch.nn.functional.pad(image, (0, missing), value=1.0) if missing > 0 else image


BATCH_RESIZE = ("bilinear", "center")  # how images joining a batch are fitted to the first


def batch_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Images as one batch: channels padded to the most any has, then each resized (bilinear,
    centre crop) to the first image's size."""
    channels = max(image.shape[-1] for image in images)
    padded = [pad_channels(image, channels) for image in images]
    height, width = padded[0].shape[1:3]
    return torch.cat([image if image.shape[1:3] == (height, width) else
                      resize_image(image, width, height, *BATCH_RESIZE)
                      for image in padded], dim=0)


class ImageBatch(Node):
    """Two image batches as one; the second is resized (bilinear, centre crop) to the first."""

    schema = NodeSchema(name="ImageBatch", display_name="Batch Images", category="image",
                        inputs=(Link("image1", "IMAGE"), Link("image2", "IMAGE")),
                        outputs=(Output("IMAGE"),))

    def execute(self, ctx: NodeContext, image1: torch.Tensor,
                image2: torch.Tensor) -> tuple[torch.Tensor]:
        return (batch_images([image1, image2]),)


def color_image(width: int, height: int, batch_size: int, color: int) -> torch.Tensor:
    """A [B, H, W, 3] batch filled with the 0xRRGGBB colour."""
    rgb = [((color >> shift) & 0xFF) / 0xFF for shift in (16, 8, 0)]
    return torch.tensor(rgb, dtype=torch.float32).expand(batch_size, height, width, 3).clone()


class EmptyImage(Node):
    """A batch of images of one solid colour."""

    schema = NodeSchema(
        name="EmptyImage", display_name="EmptyImage", category="image",
        inputs=(_size("width"), _size("height"), Int("batch_size", 1, min=1, max=4096),
                Int("color", 0, min=0, max=0xFFFFFF, step=1, options={"display": "color"})),
        outputs=(Output("IMAGE"),))

    def execute(self, ctx: NodeContext, width: int, height: int, batch_size: int,
                color: int) -> tuple[torch.Tensor]:
        return (color_image(width, height, batch_size, color),)


class ImageCrop(Node):
    """A width x height window at (x, y); offsets past the edge are pulled inside."""

    schema = NodeSchema(
        name="ImageCrop", display_name="Image Crop", category="image/transform",
        inputs=(Link("image", "IMAGE"), _size("width"), _size("height"),
                _size("x", 0, low=0), _size("y", 0, low=0)),
        outputs=(Output("IMAGE"),))

    def execute(self, ctx: NodeContext, image: torch.Tensor, width: int, height: int, x: int,
                y: int) -> tuple[torch.Tensor]:
        x = min(x, image.shape[2] - 1)
        y = min(y, image.shape[1] - 1)
        return (image[:, y:y + height, x:x + width, :].clone(),)


def outpaint_feather(height: int, width: int, sides: tuple[int, int, int, int],
                     feathering: int) -> torch.Tensor:
    """Mask [H, W] over the original image: ((f - d) / f)^2 within f pixels of a padded side.

    `sides` is (left, top, right, bottom); d is the distance to the nearest padded side."""
    left, top, right, bottom = sides
    if feathering <= 0 or feathering * 2 >= height or feathering * 2 >= width:
        return torch.zeros((height, width), dtype=torch.float32)
    rows = torch.arange(height, dtype=torch.float64)
    cols = torch.arange(width, dtype=torch.float64)
    far_rows, far_cols = torch.full_like(rows, height), torch.full_like(cols, width)
    to_top = rows if top else far_rows
    to_bottom = height - rows if bottom else far_rows
    to_left = cols if left else far_cols
    to_right = width - cols if right else far_cols
    distance = torch.minimum(torch.minimum(to_top, to_bottom)[:, None],
                             torch.minimum(to_left, to_right)[None, :])
    weight = ((feathering - distance) / feathering).clamp(min=0.0)
    return (weight * weight).float()


class ImagePadForOutpaint(Node):
    """Pad images with grey (0.5) and give the mask to inpaint: 1 on the padding, feathered in."""

    schema = NodeSchema(
        name="ImagePadForOutpaint", display_name="Pad Image for Outpainting", category="image",
        inputs=(Link("image", "IMAGE"), _size("left", 0, low=0, step=8),
                _size("top", 0, low=0, step=8), _size("right", 0, low=0, step=8),
                _size("bottom", 0, low=0, step=8), _size("feathering", 40, low=0)),
        outputs=(Output("IMAGE"), Output("MASK")))

    def execute(self, ctx: NodeContext, image: torch.Tensor, left: int, top: int, right: int,
                bottom: int, feathering: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, height, width, channels = image.shape
        padded = torch.full((batch, height + top + bottom, width + left + right, channels), 0.5,
                            dtype=torch.float32)
        padded[:, top:top + height, left:left + width, :] = image
        mask = torch.ones((height + top + bottom, width + left + right), dtype=torch.float32)
        mask[top:top + height, left:left + width] = outpaint_feather(
            height, width, (left, top, right, bottom), feathering)
        return padded, mask.unsqueeze(0)


NODE_TYPES = (ImageScale, ImageScaleBy, ImageInvert, ImageBatch, EmptyImage, ImageCrop,
              ImagePadForOutpaint)
