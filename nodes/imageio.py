"""Image files in and out: LoadImage, LoadImageMask, LoadImageOutput, SaveImage and
PreviewImage, with ComfyUI's file naming and the `prompt`/`workflow` PNG text chunks."""

from __future__ import annotations

import json
import secrets
import string
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from engine.context import NodeContext
from engine.image_budget import ImageBudget, ImageTooLarge
from engine.node import (
    Boolean,
    Combo,
    FilesIn,
    Hidden,
    Input,
    Int,
    Link,
    Node,
    NodeResult,
    NodeSchema,
    Output,
    String,
)
from nodes.filenames import InputFileNode, annotated_exists, find_annotated, prepare_save
from nodes.imaging import image_to_pil

MASK_CHANNELS = ("alpha", "red", "green", "blue")
# Formats whose extra frames are not a sequence of images (MPO: a stereo pair's second view).
_FIRST_FRAME_ONLY = frozenset({"MPO"})
_EMPTY_MASK_SIZE = 64  # ComfyUI's placeholder mask for images without alpha


def _image_choice() -> Input:
    return Combo("image", FilesIn("input"), options={"image_upload": True})


def _eight_bit_view(frame: Image.Image) -> Image.Image:
    """32-bit integer ("I") frames scaled by 1/255, as ComfyUI reads them, other modes as is."""
    return frame.point(lambda value: value * (1 / 255)) if frame.mode == "I" else frame


def frame_pixels(frame: Image.Image, out: torch.Tensor | None = None) -> torch.Tensor:
    """One frame as RGB floats [H, W, 3] in 0..1 (16-bit grey keeps its precision), written
    into `out` when given (a slot of the batch: no float copy besides it)."""
    if frame.mode.startswith("I;16"):
        grey = np.asarray(frame).astype(np.float32) / 65535.0
        pixels = torch.from_numpy(np.repeat(grey[..., None], 3, axis=-1))
        return pixels if out is None else out.copy_(pixels)
    rgb = torch.from_numpy(np.array(_eight_bit_view(frame).convert("RGB")))
    target = torch.empty(rgb.shape, dtype=torch.float32) if out is None else out
    return target.copy_(rgb).div_(255.0)


def frame_mask(frame: Image.Image) -> torch.Tensor:
    """1 - alpha [H, W] of a frame with transparency, else zeros 64x64 (ComfyUI's rule)."""
    if "A" in frame.getbands():
        alpha = frame.getchannel("A")
    elif frame.mode == "P" and "transparency" in frame.info:
        alpha = frame.convert("RGBA").getchannel("A")
    else:
        return torch.zeros((_EMPTY_MASK_SIZE, _EMPTY_MASK_SIZE), dtype=torch.float32)
    return 1.0 - torch.from_numpy(np.asarray(alpha, dtype=np.float32) / 255.0)


def _stack_masks(masks: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """Masks as one batch; placeholder masks grow to the frame size when frames differ."""
    if len({tuple(m.shape) for m in masks}) > 1:
        masks = [m if m.shape == (height, width) else torch.zeros((height, width)) for m in masks]
    return torch.stack(masks)


def load_image_file(path: Path, budget: ImageBudget) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE [B, H, W, 3] and MASK [B, H, W]: every frame the size of the first, EXIF-rotated.
    ImageTooLarge, before anything is decoded, when the frames do not fit `budget`."""
    masks: list[torch.Tensor] = []
    with Image.open(path) as source:
        budget.check(source, path.name)
        first_frame_only = source.format in _FIRST_FRAME_ONLY
        frames = 1 if first_frame_only else getattr(source, "n_frames", 1)
        size, kept = source.size, 0
        images: torch.Tensor | None = None
        for raw in ImageSequence.Iterator(source):
            if raw.size != size:
                continue  # ComfyUI skips frames whose size differs from the first (undecoded)
            frame = ImageOps.exif_transpose(raw)
            if images is None:  # one batch tensor, filled in place: no copies to stack
                images = torch.empty((frames, frame.height, frame.width, 3))
            frame_pixels(frame, images[kept])
            masks.append(frame_mask(frame))
            kept += 1
            if first_frame_only:
                break
    assert images is not None
    height, width = images.shape[1:3]
    return images[:kept], _stack_masks(masks, height, width)


def load_mask_file(path: Path, channel: str, budget: ImageBudget) -> torch.Tensor:
    """MASK [1, H, W] from one channel of the first frame; alpha gives 1 - alpha."""
    if channel not in MASK_CHANNELS:
        raise ValueError(f"LoadImageMask: unknown channel {channel!r}; use one of {MASK_CHANNELS}")
    with Image.open(path) as source:
        budget.check(source, path.name, all_frames=False)
        frame = ImageOps.exif_transpose(source)
        if frame.mode.startswith("I;16"):  # 16-bit grey: opaque, every colour channel = grey
            grey = frame_pixels(frame)[..., 0]
            return (torch.zeros_like(grey) if channel == "alpha" else grey).unsqueeze(0)
        if frame.getbands() != ("R", "G", "B", "A"):
            frame = _eight_bit_view(frame).convert("RGBA")
        band = frame.getchannel(channel[0].upper())
    values = torch.from_numpy(np.asarray(band, dtype=np.float32) / 255.0)
    return (1.0 - values if channel == "alpha" else values).unsqueeze(0)


def oversized(ctx: NodeContext, name: Any, *, all_frames: bool,
              default_folder: str = "input") -> tuple[str, str] | None:
    """("image", why) when the existing image file `name` (untagged names are in
    `default_folder`) decodes beyond the image budget."""
    paths = getattr(ctx.services, "paths", None)
    budget = getattr(ctx.services, "image_budget", None)
    if paths is None or budget is None or not annotated_exists(paths, name, default_folder):
        return None
    try:
        with Image.open(find_annotated(paths, name, default_folder)) as image:
            budget.check(image, str(name), all_frames=all_frames)
    except ImageTooLarge as exc:
        return "image", str(exc)
    except OSError:
        return None  # not an image Pillow reads: execute reports it, as before
    return None


class ImageFileNode(InputFileNode):
    """An input-folder image node: missing files and images beyond the decoded-size budget
    are refused at validation."""

    file_input = "image"
    invalid_message = "Invalid image file"
    decodes_all_frames = True

    def validate(self, ctx: NodeContext, **inputs: Any) -> tuple[str, str] | None:
        return (super().validate(ctx, **inputs)
                or oversized(ctx, inputs.get(self.file_input), all_frames=self.decodes_all_frames,
                             default_folder=self.default_folder))

    def load(self, ctx: NodeContext, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The image and its mask, within the decoded-size budget."""
        return load_image_file(find_annotated(ctx.paths, image, self.default_folder),
                               ctx.services.image_budget)


class LoadImage(ImageFileNode):
    """An image from the input folder, and its transparency as a mask (1 = transparent)."""

    schema = NodeSchema(
        name="LoadImage", display_name="Load Image", category="image",
        inputs=(_image_choice(),), outputs=(Output("IMAGE"), Output("MASK")))

    def execute(self, ctx: NodeContext, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.load(ctx, image)


class LoadImageMask(ImageFileNode):
    """One channel of an input-folder image as a mask."""

    decodes_all_frames = False

    schema = NodeSchema(
        name="LoadImageMask", display_name="Load Image (as Mask)", category="mask",
        inputs=(_image_choice(), Combo("channel", MASK_CHANNELS)),
        outputs=(Output("MASK"),))

    def execute(self, ctx: NodeContext, image: str, channel: str) -> tuple[torch.Tensor]:
        return (load_mask_file(find_annotated(ctx.paths, image), channel,
                               ctx.services.image_budget),)


class LoadImageOutput(ImageFileNode):
    """An image from the output folder (the editor lists it newest first, through
    /internal/files/output); names tagged " [input]" or " [temp]" read those folders."""

    default_folder = "output"

    schema = NodeSchema(
        name="LoadImageOutput", display_name="Load Image (from Outputs)", category="image",
        experimental=True,
        inputs=(Combo("image", FilesIn("output"), combo_style="typed", options={
            "image_folder": "output", "image_upload": True,
            "remote": {"control_after_refresh": "first", "refresh_button": True,
                       "route": "/internal/files/output"}}),),
        outputs=(Output("IMAGE"), Output("MASK")))

    def execute(self, ctx: NodeContext, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.load(ctx, image)


class WebcamCapture(ImageFileNode):
    """The frame the editor's webcam widget uploaded (it sends the file's name); width and
    height size the capture in the editor."""

    schema = NodeSchema(
        name="WebcamCapture", display_name="Webcam Capture", category="image",
        inputs=(Input("image", "WEBCAM"), Int("width", 0, min=0, max=16384, step=1),
                Int("height", 0, min=0, max=16384, step=1),
                Boolean("capture_on_queue", True)),
        outputs=(Output("IMAGE"),))

    def execute(self, ctx: NodeContext, image: str, width: int, height: int,
                capture_on_queue: bool) -> tuple[torch.Tensor]:
        return (self.load(ctx, image)[0],)


def png_metadata(prompt: Any, extra_pnginfo: Any) -> PngInfo:
    """Text chunks: "prompt" (the API graph) and one per extra_pnginfo key, as JSON."""
    info = PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        info.add_text(key, json.dumps(value))
    return info


def save_png_batch(images: torch.Tensor, root: Path, prefix: str, kind: str, compress_level: int,
                   prompt: Any = None, extra_pnginfo: Any = None) -> list[dict[str, str]]:
    """Write each image of a batch as <prefix>_<counter:05>_.png; the UI's image entries."""
    height, width = images.shape[1], images.shape[2]
    target = prepare_save(root, prefix, width=width, height=height)
    metadata = png_metadata(prompt, extra_pnginfo)
    entries = []
    for index, image in enumerate(images):
        name = target.file_name(index, ".png", batch_number=index)
        image_to_pil(image).save(target.folder / name, pnginfo=metadata,
                                 compress_level=compress_level)
        entries.append({"filename": name, "subfolder": target.subfolder, "type": kind})
    return entries


class SaveImage(Node):
    """Write images as PNGs to the output folder, with the workflow embedded."""

    schema = NodeSchema(
        name="SaveImage", display_name="Save Image", category="image", output_node=True,
        inputs=(Link("images", "IMAGE"), String("filename_prefix", default="ComfyUI"),
                Hidden("prompt", "PROMPT"), Hidden("extra_pnginfo", "EXTRA_PNGINFO")))

    def execute(self, ctx: NodeContext, images: torch.Tensor, filename_prefix: str = "ComfyUI",
                prompt: Any = None, extra_pnginfo: Any = None) -> NodeResult:
        entries = save_png_batch(images, ctx.paths.output, filename_prefix, "output", 4,
                                 prompt, extra_pnginfo)
        return NodeResult(ui={"images": entries})


def preview_prefix() -> str:
    """"ComfyUI_temp_" plus 5 random lowercase letters, so previews of prompts do not collide."""
    letters = "".join(secrets.choice(string.ascii_lowercase) for _ in range(5))
    return f"ComfyUI_temp_{letters}"


class PreviewImage(Node):
    """Write images to the temp folder for the editor to show (fast, low compression)."""

    schema = NodeSchema(
        name="PreviewImage", display_name="Preview Image", category="image", output_node=True,
        inputs=(Link("images", "IMAGE"), Hidden("prompt", "PROMPT"),
                Hidden("extra_pnginfo", "EXTRA_PNGINFO")))

    def execute(self, ctx: NodeContext, images: torch.Tensor, prompt: Any = None,
                extra_pnginfo: Any = None) -> NodeResult:
        entries = save_png_batch(images, ctx.paths.temp, preview_prefix(), "temp", 1,
                                 prompt, extra_pnginfo)
        return NodeResult(ui={"images": entries})


NODE_TYPES = (LoadImage, LoadImageMask, LoadImageOutput, WebcamCapture, SaveImage, PreviewImage)
