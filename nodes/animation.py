"""Animated image files: SaveAnimatedWEBP and SaveAnimatedPNG write an image batch as the
frames of one file in the output folder, with the workflow embedded as ComfyUI does (EXIF
"prompt:{...}" strings for WebP, "comf" chunks after the image data for APNG)."""

from __future__ import annotations

import json
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from engine.context import NodeContext
from engine.node import (
    Boolean,
    Combo,
    Float,
    Hidden,
    Int,
    Link,
    Node,
    NodeResult,
    NodeSchema,
    String,
)
from nodes.filenames import prepare_save
from nodes.imaging import image_to_pil

WEBP_METHODS = {"default": 4, "fastest": 0, "slowest": 6}  # Pillow's WebP `method` effort
EXIF_MODEL, EXIF_MAKE = 0x0110, 0x010F  # the prompt goes in Model, extra keys count down from Make


def _inputs(*extra: Any) -> tuple[Any, ...]:
    return (Link("images", "IMAGE"),
            String("filename_prefix", default="ComfyUI", options={"multiline": False}),
            Float("fps", 6.0, min=0.01, max=1000.0, step=0.01)) + extra + (
        Hidden("prompt", "PROMPT"), Hidden("extra_pnginfo", "EXTRA_PNGINFO"))


def _schema(name: str, *extra: Any) -> NodeSchema:
    return NodeSchema(name, _inputs(*extra), (), category="image/animation", output_node=True,
                      comfy_v3=True)


def webp_exif(first: Image.Image, prompt: Any, extra_pnginfo: Any) -> Image.Exif:
    """EXIF strings "prompt:<json>" and "<key>:<json>" for each extra_pnginfo key."""
    exif = first.getexif()
    if prompt is not None:
        exif[EXIF_MODEL] = f"prompt:{json.dumps(prompt)}"
    for offset, (key, value) in enumerate((extra_pnginfo or {}).items()):
        exif[EXIF_MAKE - offset] = f"{key}:{json.dumps(value)}"
    return exif


def apng_info(prompt: Any, extra_pnginfo: Any) -> PngInfo:
    """'comf' chunks (keyword, NUL, JSON) placed after the frames, as ComfyUI writes them."""
    info = PngInfo()
    entries = ([("prompt", prompt)] if prompt is not None else []) + list(
        (extra_pnginfo or {}).items())
    for key, value in entries:
        info.add(b"comf", key.encode("latin-1") + b"\0" + json.dumps(value).encode("latin-1"),
                 after_idat=True)
    return info


def save_animation(ctx: NodeContext, images: torch.Tensor, prefix: str, suffix: str,
                   **options: Any) -> NodeResult:
    """Write the batch as one animated file; the UI entry the editor shows."""
    target = prepare_save(ctx.paths.output, prefix, width=images.shape[2], height=images.shape[1])
    frames = [image_to_pil(image) for image in images]
    name = target.file_name(0, suffix)
    frames[0].save(target.folder / name, save_all=True, append_images=frames[1:], **options)
    entry = {"filename": name, "subfolder": target.subfolder, "type": "output"}
    return NodeResult(ui={"images": [entry], "animated": (len(frames) > 1,)})


class SaveAnimatedWEBP(Node):
    schema = _schema("SaveAnimatedWEBP", Boolean("lossless", True),
                     Int("quality", 80, min=0, max=100),
                     Combo("method", tuple(WEBP_METHODS), combo_style="v3"))

    def execute(self, ctx: NodeContext, images: torch.Tensor, filename_prefix: str, fps: float,
                lossless: bool, quality: int, method: str, prompt: Any = None,
                extra_pnginfo: Any = None) -> NodeResult:
        first = image_to_pil(images[0])
        return save_animation(ctx, images, filename_prefix, ".webp", duration=int(1000.0 / fps),
                              exif=webp_exif(first, prompt, extra_pnginfo), lossless=lossless,
                              quality=quality, method=WEBP_METHODS[method])


class SaveAnimatedPNG(Node):
    schema = _schema("SaveAnimatedPNG", Int("compress_level", 4, min=0, max=9))

    def execute(self, ctx: NodeContext, images: torch.Tensor, filename_prefix: str, fps: float,
                compress_level: int, prompt: Any = None, extra_pnginfo: Any = None
                ) -> NodeResult:
        return save_animation(ctx, images, filename_prefix, ".png", duration=int(1000.0 / fps),
                              pnginfo=apng_info(prompt, extra_pnginfo),
                              compress_level=compress_level)


NODE_TYPES = (SaveAnimatedWEBP, SaveAnimatedPNG)
