"""Image post-processing nodes: blend modes, blur, sharpen, colour quantisation (Pillow's, with
ComfyUI's ordered Bayer dithering), morphology and Canny edges."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from engine.context import NodeContext
from engine.image_filters import canny, gaussian_blur, morphology, sharpen
from engine.node import Combo, Float, Input, Int, Link, Node, NodeSchema, Output
from nodes.imaging import match_alpha, resize_image, to_uint8

MORPHOLOGY_OPERATIONS = ("erode", "dilate", "open", "close", "gradient", "bottom_hat", "top_hat")
DITHERS = ("none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16")


def _soft_light_curve(x: torch.Tensor) -> torch.Tensor:
    """The W3C soft-light D(x) curve."""
    return torch.where(x <= 0.25, ((16 * x - 12) * x + 4) * x, torch.sqrt(x))


BLEND_MODES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "normal": lambda a, b: b,
    "multiply": lambda a, b: a * b,
    "screen": lambda a, b: 1 - (1 - a) * (1 - b),
    "overlay": lambda a, b: torch.where(a <= 0.5, 2 * a * b, 1 - 2 * (1 - a) * (1 - b)),
    "soft_light": lambda a, b: torch.where(b <= 0.5, a - (1 - 2 * b) * a * (1 - a),
                                           a + (2 * b - 1) * (_soft_light_curve(a) - a)),
    "difference": lambda a, b: a - b,  # ComfyUI's: signed, then clamped with the result
}


def _schema(name: str, inputs: tuple[Input, ...], category: str = "image/postprocessing",
            display_name: str | None = None) -> NodeSchema:
    return NodeSchema(name, (Link("image", "IMAGE"),) + inputs, (Output("IMAGE"),),
                      category=category, display_name=display_name, comfy_v3=True)


def channels_first(function: Callable[[torch.Tensor], torch.Tensor],
                   image: torch.Tensor) -> torch.Tensor:
    """Apply a [B, C, H, W] filter to an IMAGE [B, H, W, C]."""
    return function(image.movedim(-1, 1)).movedim(1, -1)


class ImageBlend(Node):
    """image1 mixed towards image1 <mode> image2 by blend_factor."""

    schema = NodeSchema(
        "ImageBlend", (Link("image1", "IMAGE"), Link("image2", "IMAGE"),
                       Float("blend_factor", 0.5, min=0.0, max=1.0, step=0.01),
                       Combo("blend_mode", tuple(BLEND_MODES), combo_style="v3")),
        (Output("IMAGE"),), category="image/postprocessing", comfy_v3=True)

    def execute(self, ctx: NodeContext, image1: torch.Tensor, image2: torch.Tensor,
                blend_factor: float, blend_mode: str) -> tuple[torch.Tensor]:
        if blend_mode not in BLEND_MODES:
            raise ValueError(f"ImageBlend: unknown blend_mode {blend_mode!r}; use one of "
                             f"{tuple(BLEND_MODES)}")
        image1, image2 = match_alpha(image1, image2)
        if image2.shape != image1.shape:
            image2 = resize_image(image2, image1.shape[2], image1.shape[1], "bicubic", "center")
        blended = BLEND_MODES[blend_mode](image1, image2)
        return ((image1 * (1 - blend_factor) + blended * blend_factor).clamp(0, 1),)


class ImageBlur(Node):
    schema = _schema("ImageBlur", (Int("blur_radius", 1, min=1, max=31, step=1),
                                   Float("sigma", 1.0, min=0.1, max=10.0, step=0.1)))

    def execute(self, ctx: NodeContext, image: torch.Tensor, blur_radius: int,
                sigma: float) -> tuple[torch.Tensor]:
        if blur_radius == 0:
            return (image,)
        return (channels_first(lambda x: gaussian_blur(x, blur_radius, sigma), image),)


class ImageSharpen(Node):
    schema = _schema("ImageSharpen", (Int("sharpen_radius", 1, min=1, max=31, step=1),
                                      Float("sigma", 1.0, min=0.1, max=10.0, step=0.01),
                                      Float("alpha", 1.0, min=0.0, max=5.0, step=0.01)))

    def execute(self, ctx: NodeContext, image: torch.Tensor, sharpen_radius: int, sigma: float,
                alpha: float) -> tuple[torch.Tensor]:
        if sharpen_radius == 0:
            return (image,)
        sharpened = channels_first(lambda x: sharpen(x, sharpen_radius, sigma, alpha), image)
        return (sharpened.clamp(0, 1),)


def bayer_matrix(order: int) -> np.ndarray:
    """The normalised ordered-dither matrix of side `order` (a power of two), centred on 0."""
    matrix = np.zeros((1, 1))
    for level in range(1, int(math.log2(order)) + 1):
        scale = 4 ** level
        grown = scale * matrix
        matrix = np.block([[grown - 1.5, grown + 0.5], [grown + 1.5, grown - 0.5]]) / scale
    return matrix


def bayer_dither(image: Image.Image, palette: Image.Image, order: int) -> Image.Image:
    """Add the tiled Bayer threshold (spread over one palette step) and map to the palette."""
    colours = len(palette.getpalette()) // 3
    threshold = 2 * 256 / colours * bayer_matrix(order) + 0.5
    pixels = np.asarray(image).astype(np.float32)
    reps = (math.ceil(pixels.shape[0] / order), math.ceil(pixels.shape[1] / order))
    tiled = np.tile(threshold, reps)[:pixels.shape[0], :pixels.shape[1], None]
    shifted = np.clip(pixels + tiled.astype(np.float32), 0, 255).astype(np.uint8)
    return Image.fromarray(shifted).quantize(palette=palette, dither=Image.Dither.NONE)


def quantize(image: torch.Tensor, colors: int, dither: str) -> torch.Tensor:
    """One RGB image [H, W, 3] reduced to a `colors`-colour median-cut palette."""
    picture = Image.fromarray(to_uint8(image[..., :3]))
    palette = picture.quantize(colors=colors)  # the palette must come from a first pass
    if dither.startswith("bayer-"):
        reduced = bayer_dither(picture, palette, int(dither.split("-")[1]))
    else:
        method = Image.Dither.FLOYDSTEINBERG if dither == "floyd-steinberg" else \
            Image.Dither.NONE
        reduced = picture.quantize(palette=palette, dither=method)
    return torch.from_numpy(np.asarray(reduced.convert("RGB"), dtype=np.float32) / 255.0)


class ImageQuantize(Node):
    schema = _schema("ImageQuantize", (Int("colors", 256, min=1, max=256, step=1),
                                       Combo("dither", DITHERS, combo_style="v3")))

    def execute(self, ctx: NodeContext, image: torch.Tensor, colors: int,
                dither: str) -> tuple[torch.Tensor]:
        if dither not in DITHERS:
            raise ValueError(f"ImageQuantize: unknown dither {dither!r}; use one of {DITHERS}")
        return (torch.stack([quantize(picture, colors, dither) for picture in image]),)


class Morphology(Node):
    schema = _schema("Morphology", (Combo("operation", MORPHOLOGY_OPERATIONS, combo_style="v3"),
                                    Int("kernel_size", 3, min=3, max=999, step=1)),
                     display_name="ImageMorphology")

    def execute(self, ctx: NodeContext, image: torch.Tensor, operation: str,
                kernel_size: int) -> tuple[torch.Tensor]:
        return (channels_first(lambda x: morphology(x, operation, kernel_size), image),)


class Canny(Node):
    schema = _schema("Canny", (Float("low_threshold", 0.4, min=0.01, max=0.99, step=0.01),
                               Float("high_threshold", 0.8, min=0.01, max=0.99, step=0.01)),
                     category="image/preprocessors")

    def execute(self, ctx: NodeContext, image: torch.Tensor, low_threshold: float,
                high_threshold: float) -> tuple[torch.Tensor]:
        edges = canny(image[..., :3].movedim(-1, 1), low_threshold, high_threshold)
        return (edges.repeat(1, 3, 1, 1).movedim(1, -1),)


NODE_TYPES = (ImageBlend, ImageBlur, ImageSharpen, ImageQuantize, Morphology, Canny)
