"""Latent-space nodes: empty latents, upscaling (bislerp included), compositing, blending,
crops, flips, rotations, batch slicing and noise masks, and .latent files.

A LATENT is a `Latent` with `samples` [B, C, H/8, W/8]; nodes return new Latents."""

from __future__ import annotations

import json
from typing import Any

import safetensors.torch
import torch

from engine.context import NodeContext
from engine.image_ops import repeat_to_batch
from engine.node import (
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
    String,
)
from engine.values import Latent
from nodes.filenames import (
    FilesWithSuffix,
    InputFileNode,
    find_annotated,
    prepare_save,
)
from nodes.imaging import (
    CROP_METHODS,
    LATENT_UPSCALE_METHODS,
    MAX_RESOLUTION,
    repeat_batch,
    resize,
)

LATENT_CHANNELS = 4  # SD1, SD2 and SDXL latents
# SD1's VAE scale factor: .latent files without a version key hold latents multiplied by it.
LEGACY_LATENT_SCALE = 0.18215
FLIP_METHODS = ("x-axis: vertically", "y-axis: horizontally")
ROTATIONS = ("none", "90 degrees", "180 degrees", "270 degrees")


def _samples(name: str = "samples") -> Input:
    return Link(name, "LATENT")


def _pixels(name: str, default: int = 512, low: int = 0) -> Input:
    """A pixel size/offset widget in steps of 8 (one latent cell)."""
    return Int(name, default, min=low, max=MAX_RESOLUTION, step=8)


def _latent_output() -> tuple[Output, ...]:
    return (Output("LATENT"),)


class EmptyLatentImage(Node):
    """A batch of all-zero latents for a width x height image."""

    schema = NodeSchema(
        name="EmptyLatentImage", display_name="Empty Latent Image", category="latent",
        inputs=(_pixels("width", low=16), _pixels("height", low=16),
                Int("batch_size", 1, min=1, max=4096)),
        outputs=_latent_output())

    def execute(self, ctx: NodeContext, width: int, height: int,
                batch_size: int) -> tuple[Latent]:
        shape = (batch_size, LATENT_CHANNELS, height // 8, width // 8)
        return (Latent(torch.zeros(shape, dtype=torch.float32)),)


def latent_target_size(samples: torch.Tensor, width: int, height: int) -> tuple[int, int]:
    """Pixel size for LatentUpscale: at least 64, a 0 side following the aspect ratio."""
    old_height, old_width = samples.shape[-2], samples.shape[-1]
    if width == 0:
        height = max(64, height)
        width = max(64, round(old_width * height / old_height))
    elif height == 0:
        width = max(64, width)
        height = max(64, round(old_height * width / old_width))
    return max(64, width), max(64, height)


class LatentUpscale(Node):
    """Resize latents to a pixel width and height (0 keeps the aspect ratio)."""

    schema = NodeSchema(
        name="LatentUpscale", display_name="Upscale Latent", category="latent",
        inputs=(_samples(), Combo("upscale_method", LATENT_UPSCALE_METHODS), _pixels("width"),
                _pixels("height"), Combo("crop", CROP_METHODS)),
        outputs=_latent_output())

    def execute(self, ctx: NodeContext, samples: Latent, upscale_method: str, width: int,
                height: int, crop: str) -> tuple[Latent]:
        latent = Latent.of(samples)
        if width == 0 and height == 0:
            return (latent,)
        width, height = latent_target_size(latent.samples, width, height)
        resized = resize(latent.samples, width // 8, height // 8, upscale_method, crop)
        return (latent.replace(samples=resized),)


class LatentUpscaleBy(Node):
    """Resize latents by a factor."""

    schema = NodeSchema(
        name="LatentUpscaleBy", display_name="Upscale Latent By", category="latent",
        inputs=(_samples(), Combo("upscale_method", LATENT_UPSCALE_METHODS),
                Float("scale_by", 1.5, min=0.01, max=8.0, step=0.01)),
        outputs=_latent_output())

    def execute(self, ctx: NodeContext, samples: Latent, upscale_method: str,
                scale_by: float) -> tuple[Latent]:
        latent = Latent.of(samples)
        width = max(1, round(latent.samples.shape[-1] * scale_by))
        height = max(1, round(latent.samples.shape[-2] * scale_by))
        return (latent.replace(samples=resize(latent.samples, width, height, upscale_method)),)


def edge_ramp(size: int, feather: int, fade_start: bool, fade_end: bool) -> torch.Tensor:
    """Weights [size]: (t + 1) / feather on the t-th cell from each faded end, 1 elsewhere."""
    weights = torch.ones(size, dtype=torch.float64)
    count = min(feather, size)
    ramp = (torch.arange(count, dtype=torch.float64) + 1) / feather
    if fade_start:
        weights[:count] *= ramp
    if fade_end:
        weights[size - count:] *= ramp.flip(0)
    return weights


def composite(target: torch.Tensor, source: torch.Tensor, x: int, y: int,
              feather: int) -> torch.Tensor:
    """`source` pasted into a copy of `target` at latent cell (x, y), edges inside blended."""
    out = target.clone()
    height, width = target.shape[-2], target.shape[-1]
    if x >= width or y >= height:
        return out
    source = source[..., :height - y, :width - x]
    if source.shape[0] not in (1, target.shape[0]):
        raise ValueError(f"LatentComposite: samples_from has batch {source.shape[0]}, "
                         f"samples_to has {target.shape[0]}; use equal batches or one latent")
    rows, cols = source.shape[-2], source.shape[-1]
    region = out[..., y:y + rows, x:x + cols]
    if feather == 0:
        region[...] = source
        return out
    mask_rows = edge_ramp(rows, feather, y != 0, y + rows < height)
    mask_cols = edge_ramp(cols, feather, x != 0, x + cols < width)
    mask = (mask_rows[:, None] * mask_cols[None, :]).to(target.dtype)
    region[...] = source * mask + region * (1.0 - mask)
    return out


class LatentComposite(Node):
    """Paste one latent into another at a pixel offset, optionally feathering the seam."""

    schema = NodeSchema(
        name="LatentComposite", display_name="Latent Composite", category="latent",
        inputs=(_samples("samples_to"), _samples("samples_from"), _pixels("x", 0),
                _pixels("y", 0), _pixels("feather", 0)),
        outputs=_latent_output())

    def execute(self, ctx: NodeContext, samples_to: Latent, samples_from: Latent, x: int, y: int,
                feather: int) -> tuple[Latent]:
        target = Latent.of(samples_to)
        pasted = composite(target.samples, Latent.of(samples_from).samples, x // 8, y // 8,
                           feather // 8)
        return (target.replace(samples=pasted),)


class LatentBlend(Node):
    """samples1 * blend_factor + samples2 * (1 - blend_factor)."""

    schema = NodeSchema(
        name="LatentBlend", display_name="Latent Blend", category="_for_testing",
        inputs=(_samples("samples1"), _samples("samples2"),
                Float("blend_factor", 0.5, min=0.0, max=1.0, step=0.01)),
        outputs=_latent_output())

    def execute(self, ctx: NodeContext, samples1: Latent, samples2: Latent,
                blend_factor: float) -> tuple[Latent]:
        first, second = Latent.of(samples1), Latent.of(samples2).samples
        if second.shape != first.samples.shape:
            second = resize(second, first.samples.shape[-1], first.samples.shape[-2], "bicubic",
                            "center")
        blended = first.samples * blend_factor + second * (1.0 - blend_factor)
        return (first.replace(samples=blended),)


class LatentCrop(Node):
    """A width x height pixel window of the latents at (x, y), at least 8 cells from the edge."""

    schema = NodeSchema(
        name="LatentCrop", display_name="Crop Latent", category="latent/transform",
        inputs=(_samples(), _pixels("width", low=64), _pixels("height", low=64), _pixels("x", 0),
                _pixels("y", 0)),
        outputs=_latent_output())

    def execute(self, ctx: NodeContext, samples: Latent, width: int, height: int, x: int,
                y: int) -> tuple[Latent]:
        latent = Latent.of(samples)
        values = latent.samples
        x = max(0, min(x // 8, values.shape[-1] - 8))
        y = max(0, min(y // 8, values.shape[-2] - 8))
        cropped = values[..., y:y + height // 8, x:x + width // 8].clone()
        return (latent.replace(samples=cropped),)


class LatentFlip(Node):
    """Mirror latents vertically (x-axis) or horizontally (y-axis)."""

    schema = NodeSchema(
        name="LatentFlip", display_name="Flip Latent", category="latent/transform",
        inputs=(_samples(), Combo("flip_method", FLIP_METHODS)), outputs=_latent_output())

    def execute(self, ctx: NodeContext, samples: Latent, flip_method: str) -> tuple[Latent]:
        latent = Latent.of(samples)
        if flip_method not in FLIP_METHODS:
            raise ValueError(f"LatentFlip: unknown flip_method {flip_method!r}; "
                             f"use one of {FLIP_METHODS}")
        dim = 2 if flip_method.startswith("x") else 3
        return (latent.replace(samples=torch.flip(latent.samples, dims=[dim])),)


class LatentRotate(Node):
    """Rotate latents clockwise by a multiple of 90 degrees."""

    schema = NodeSchema(
        name="LatentRotate", display_name="Rotate Latent", category="latent/transform",
        inputs=(_samples(), Combo("rotation", ROTATIONS)), outputs=_latent_output())

    def execute(self, ctx: NodeContext, samples: Latent, rotation: str) -> tuple[Latent]:
        latent = Latent.of(samples)
        if rotation not in ROTATIONS:
            raise ValueError(f"LatentRotate: unknown rotation {rotation!r}; use one of {ROTATIONS}")
        quarter_turns = ROTATIONS.index(rotation)
        # dims (W, H): from the width axis towards the height axis, i.e. clockwise on screen.
        rotated = torch.rot90(latent.samples, k=quarter_turns, dims=[3, 2])
        return (latent.replace(samples=rotated.contiguous()),)


def fit_to(target_shape: torch.Size, samples: torch.Tensor, repeat: bool = True) -> torch.Tensor:
    """`samples` resized (bilinear, centre crop) to the target's size and, with `repeat`,
    repeated or cut to its batch size (ComfyUI's reshape_latent_to)."""
    if samples.shape[1:] != target_shape[1:]:
        samples = resize(samples, target_shape[-1], target_shape[-2], "bilinear", "center")
    return repeat_to_batch(samples, target_shape[0]) if repeat else samples


def batch_indices(latent: Latent, offset: int = 0) -> list[int]:
    """The latent's batch_index, else offset, offset + 1, ... for each entry."""
    known = latent.batch_index
    return list(known) if known is not None else [offset + index for index in
                                                  range(latent.samples.shape[0])]


def batch_latents(latents: list[Latent]) -> Latent:
    """Latents as one batch, each resized to the first one's size; batch indices joined."""
    first = latents[0]
    samples = torch.cat([fit_to(first.samples.shape, latent.samples, repeat=False)
                         for latent in latents])
    indices = [index for latent in latents for index in batch_indices(latent)]
    return first.replace(samples=samples, batch_index=indices)


class LatentFromBatch(Node):
    """`length` latents starting at `batch_index`; batch_index records which ones they were."""

    schema = NodeSchema(
        name="LatentFromBatch", display_name="Latent From Batch", category="latent/batch",
        inputs=(_samples(), Int("batch_index", 0, min=0, max=63), Int("length", 1, min=1, max=64)),
        outputs=_latent_output())

    def execute(self, ctx: NodeContext, samples: Latent, batch_index: int,
                length: int) -> tuple[Latent]:
        latent = Latent.of(samples)
        count = latent.samples.shape[0]
        start = min(count - 1, batch_index)
        stop = start + min(count - start, length)
        taken = latent.replace(samples=latent.samples[start:stop].clone(),
                               batch_index=batch_indices(latent)[start:stop])
        mask = latent.noise_mask
        if mask is not None and mask.shape[0] > 1:
            mask = repeat_to_batch(mask, count)[start:stop]
        return (taken if mask is None else taken.replace(noise_mask=mask.clone()),)


class RepeatLatentBatch(Node):
    """The batch repeated `amount` times; copies get batch indices offset past the originals."""

    schema = NodeSchema(
        name="RepeatLatentBatch", display_name="Repeat Latent Batch", category="latent/batch",
        inputs=(_samples(), Int("amount", 1, min=1, max=64)), outputs=_latent_output())

    def execute(self, ctx: NodeContext, samples: Latent, amount: int) -> tuple[Latent]:
        latent = Latent.of(samples)
        values = latent.samples
        changes: dict[str, Any] = {"samples": repeat_batch(values, amount)}
        mask = latent.noise_mask
        if mask is not None and mask.shape[0] > 1:
            changes["noise_mask"] = repeat_batch(repeat_to_batch(mask, values.shape[0]), amount)
        if latent.batch_index is not None:
            indices = latent.batch_index
            offset = max(indices) - min(indices) + 1
            changes["batch_index"] = [index + copy * offset for copy in range(amount)
                                      for index in indices]
        return (latent.replace(**changes),)


class LatentBatch(Node):
    """Two latent batches as one (the second resized to the first's size if needed)."""

    schema = NodeSchema(
        name="LatentBatch", category="latent/batch",
        inputs=(_samples("samples1"), _samples("samples2")), outputs=_latent_output())

    def execute(self, ctx: NodeContext, samples1: Latent, samples2: Latent) -> tuple[Latent]:
        return (batch_latents([Latent.of(samples1), Latent.of(samples2)]),)


class SetLatentNoiseMask(Node):
    """Attach a mask so sampling only changes the masked area (1 = repaint)."""

    schema = NodeSchema(
        name="SetLatentNoiseMask", display_name="Set Latent Noise Mask",
        category="latent/inpaint", inputs=(_samples(), Link("mask", "MASK")),
        outputs=_latent_output())

    def execute(self, ctx: NodeContext, samples: Latent, mask: torch.Tensor) -> tuple[Latent]:
        noise_mask = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))  # (B, 1, H, W)
        return (Latent.of(samples).replace(noise_mask=noise_mask),)


def latent_metadata(prompt: Any, extra_pnginfo: Any) -> dict[str, str]:
    """safetensors metadata: "prompt" and each extra_pnginfo key as JSON text."""
    metadata = {"prompt": json.dumps(prompt) if prompt is not None else ""}
    for key, value in (extra_pnginfo or {}).items():
        metadata[key] = json.dumps(value)
    return metadata


class SaveLatent(Node):
    """Write latents to the output folder as a .latent (safetensors) file."""

    schema = NodeSchema(
        name="SaveLatent", display_name="SaveLatent", category="_for_testing", output_node=True,
        inputs=(_samples(), String("filename_prefix", default="latents/ComfyUI"),
                Hidden("prompt", "PROMPT"), Hidden("extra_pnginfo", "EXTRA_PNGINFO")))

    def execute(self, ctx: NodeContext, samples: Latent, filename_prefix: str = "latents/ComfyUI",
                prompt: Any = None, extra_pnginfo: Any = None) -> NodeResult:
        target = prepare_save(ctx.paths.output, filename_prefix)
        name = target.file_name(0, ".latent")
        tensors = {"latent_tensor": Latent.of(samples).samples.contiguous(),
                   "latent_format_version_0": torch.tensor([])}
        safetensors.torch.save_file(tensors, str(target.folder / name),
                                    metadata=latent_metadata(prompt, extra_pnginfo))
        entry = {"filename": name, "subfolder": target.subfolder, "type": "output"}
        return NodeResult(ui={"latents": [entry]})


class LoadLatent(InputFileNode):
    """Latents from a .latent file in the input folder."""

    file_input = "latent"
    invalid_message = "Invalid latent file"

    schema = NodeSchema(
        name="LoadLatent", display_name="LoadLatent", category="_for_testing",
        inputs=(Combo("latent", FilesWithSuffix("input", ".latent")),), outputs=_latent_output())

    def execute(self, ctx: NodeContext, latent: str) -> tuple[Latent]:
        tensors = safetensors.torch.load_file(str(find_annotated(ctx.paths, latent)), device="cpu")
        if "latent_tensor" not in tensors:
            raise ValueError(f"LoadLatent: {latent!r} has no 'latent_tensor' entry; it is not a "
                             f".latent file written by SaveLatent")
        scale = 1.0 if "latent_format_version_0" in tensors else 1.0 / LEGACY_LATENT_SCALE
        return (Latent(tensors["latent_tensor"].float() * scale),)


NODE_TYPES = (EmptyLatentImage, LatentUpscale, LatentUpscaleBy, LatentComposite, LatentBlend,
              LatentCrop, LatentFlip, LatentRotate, LatentFromBatch, RepeatLatentBatch,
              LatentBatch, SetLatentNoiseMask, SaveLatent, LoadLatent)
