"""Latent arithmetic and batch nodes (ComfyUI's latent/advanced and latent/batch extras):
add, subtract, multiply, interpolate, concatenate, cut, cut into a batch, seed behaviour,
joining batches and re-batching a list of latents."""

from __future__ import annotations

from typing import Any

import torch

from engine.context import NodeContext
from engine.dynamic_inputs import Autogrow, GroupedInputsNode
from engine.image_ops import repeat_to_batch
from engine.node import Combo, Float, Input, Int, Link, Node, NodeSchema, Output
from engine.values import Latent
from nodes.imaging import MAX_RESOLUTION
from nodes.latent import batch_indices, batch_latents, fit_to

LATENT_CELL = 8  # pixels per latent cell (default noise masks are at pixel size)


def _schema(name: str, inputs: tuple[Input, ...], category: str = "latent/advanced",
            **kw: Any) -> NodeSchema:
    return NodeSchema(name, inputs, kw.pop("outputs", (Output("LATENT"),)), category=category,
                      comfy_v3=True, **kw)


def _pair() -> tuple[Input, Input]:
    return Link("samples1", "LATENT"), Link("samples2", "LATENT")


class LatentAdd(Node):
    schema = _schema("LatentAdd", _pair())

    def execute(self, ctx: NodeContext, samples1: Latent, samples2: Latent) -> tuple[Latent]:
        first = Latent.of(samples1)
        other = fit_to(first.samples.shape, Latent.of(samples2).samples)
        return (first.replace(samples=first.samples + other),)


class LatentSubtract(Node):
    schema = _schema("LatentSubtract", _pair())

    def execute(self, ctx: NodeContext, samples1: Latent, samples2: Latent) -> tuple[Latent]:
        first = Latent.of(samples1)
        other = fit_to(first.samples.shape, Latent.of(samples2).samples)
        return (first.replace(samples=first.samples - other),)


class LatentMultiply(Node):
    schema = _schema("LatentMultiply", (Link("samples", "LATENT"),
                                        Float("multiplier", 1.0, min=-10.0, max=10.0, step=0.01)))

    def execute(self, ctx: NodeContext, samples: Latent, multiplier: float) -> tuple[Latent]:
        latent = Latent.of(samples)
        return (latent.replace(samples=latent.samples * multiplier),)


def interpolate(first: torch.Tensor, second: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per latent cell: the directions (channel vectors) lerped and renormalised, the lengths
    lerped; ratio 1 gives `first`. (ComfyUI divides by norms without keepdim, which agrees for
    a batch of one and fails or mixes batch entries otherwise; this is the batch-safe form.)"""
    norm1 = torch.linalg.vector_norm(first, dim=1, keepdim=True)
    norm2 = torch.linalg.vector_norm(second, dim=1, keepdim=True)
    mixed = torch.nan_to_num(first / norm1) * ratio + torch.nan_to_num(second / norm2) * (
        1.0 - ratio)
    direction = torch.nan_to_num(mixed / torch.linalg.vector_norm(mixed, dim=1, keepdim=True))
    return direction * (norm1 * ratio + norm2 * (1.0 - ratio))


class LatentInterpolate(Node):
    schema = _schema("LatentInterpolate", _pair() + (
        Float("ratio", 1.0, min=0.0, max=1.0, step=0.01),))

    def execute(self, ctx: NodeContext, samples1: Latent, samples2: Latent,
                ratio: float) -> tuple[Latent]:
        first = Latent.of(samples1)
        other = fit_to(first.samples.shape, Latent.of(samples2).samples)
        return (first.replace(samples=interpolate(first.samples, other, ratio)),)


def axis(samples: torch.Tensor, dim: str) -> int:
    """The tensor dimension a ComfyUI axis name ("x", "y", "t", any sign) means: the last,
    the one before, and the third from last (the channels of an image latent)."""
    letter = dim.lstrip("-")
    if letter not in ("x", "y", "t"):
        raise ValueError(f"unknown latent axis {dim!r}; use x, y or t")
    return samples.dim() - 1 - ("x", "y", "t").index(letter)


class LatentConcat(Node):
    """samples2 joined after samples1 along an axis ("-" puts it before)."""

    schema = _schema("LatentConcat", _pair() + (
        Combo("dim", ("x", "-x", "y", "-y", "t", "-t"), combo_style="v3"),))

    def execute(self, ctx: NodeContext, samples1: Latent, samples2: Latent,
                dim: str) -> tuple[Latent]:
        first = Latent.of(samples1)
        other = repeat_to_batch(Latent.of(samples2).samples, first.samples.shape[0])
        parts = (other, first.samples) if dim.startswith("-") else (first.samples, other)
        return (first.replace(samples=torch.cat(parts, dim=axis(first.samples, dim))),)


class LatentCut(Node):
    """`amount` entries along an axis from `index` (negative counts from the end)."""

    schema = _schema("LatentCut", (
        Link("samples", "LATENT"), Combo("dim", ("x", "y", "t"), combo_style="v3"),
        Int("index", 0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION, step=1),
        Int("amount", 1, min=1, max=MAX_RESOLUTION, step=1)))

    def execute(self, ctx: NodeContext, samples: Latent, dim: str, index: int,
                amount: int) -> tuple[Latent]:
        latent = Latent.of(samples)
        values = latent.samples
        along = axis(values, dim)
        size = values.shape[along]
        if index >= 0:
            index = min(index, size - 1)
            amount = min(size - index, amount)
        else:
            index = max(index, -size)
            amount = min(-index, amount)
        return (latent.replace(samples=torch.narrow(values, along, index, amount)),)


class LatentCutToBatch(Node):
    """Slices of `slice_size` along an axis become batch entries (a remainder is dropped)."""

    schema = _schema("LatentCutToBatch", (
        Link("samples", "LATENT"), Combo("dim", ("t", "x", "y"), combo_style="v3"),
        Int("slice_size", 1, min=1, max=MAX_RESOLUTION, step=1)))

    def execute(self, ctx: NodeContext, samples: Latent, dim: str,
                slice_size: int) -> tuple[Latent]:
        latent = Latent.of(samples)
        along = axis(latent.samples, dim)
        if along < 2:  # the channel axis of an image latent: nothing to cut
            return (latent,)
        moved = latent.samples.movedim(along, 1)
        slice_size = min(slice_size, moved.shape[1])
        moved = moved[:, :moved.shape[1] // slice_size * slice_size]
        cut = moved.reshape([-1, slice_size, *moved.shape[2:]]).movedim(1, along)
        return (latent.replace(samples=cut),)


class LatentBatchSeedBehavior(Node):
    """"fixed": every entry gets the first entry's noise; "random": each its own."""

    schema = _schema("LatentBatchSeedBehavior", (
        Link("samples", "LATENT"),
        Combo("seed_behavior", ("random", "fixed"), default="fixed", combo_style="v3")))

    def execute(self, ctx: NodeContext, samples: Latent, seed_behavior: str) -> tuple[Latent]:
        latent = Latent.of(samples)
        if seed_behavior == "random":
            return (Latent(**{k: v for k, v in latent.items() if k != "batch_index"}),)
        first = (latent.batch_index or [0])[0]
        return (latent.replace(batch_index=[first] * latent.samples.shape[0]),)


class BatchLatentsNode(GroupedInputsNode):
    schema = _schema("BatchLatentsNode",
                     (Autogrow("latents", Link("latent", "LATENT"), "latent", 2, 50),),
                     category="latent", display_name="Batch Latents")

    def run(self, ctx: NodeContext, latents: dict[str, Latent]) -> tuple[Latent]:
        return (batch_latents([Latent.of(latent) for latent in latents.values()]),)


def _noise_mask(latent: Latent) -> torch.Tensor:
    """The latent's noise mask at batch size, or an all-ones pixel-size mask."""
    samples = latent.samples
    mask = latent.noise_mask
    if mask is None:
        return torch.ones((samples.shape[0], 1, samples.shape[-2] * LATENT_CELL,
                           samples.shape[-1] * LATENT_CELL), device=samples.device)
    mask = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))
    return repeat_to_batch(mask, samples.shape[0]) if mask.shape[0] < samples.shape[0] else mask


def _runs(latents: list[Latent]) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Consecutive latents of one size joined: (samples, noise masks, batch indices) per run."""
    runs: list[tuple[torch.Tensor, torch.Tensor, list[int]]] = []
    seen = 0
    for latent in latents:
        entry = (latent.samples, _noise_mask(latent), batch_indices(latent, seen))
        seen += len(entry[2])
        if runs and runs[-1][0].shape[-2:] == entry[0].shape[-2:]:
            last = runs[-1]
            entry = (torch.cat((last[0], entry[0])), torch.cat((last[1], entry[1])),
                     last[2] + entry[2])
            runs[-1] = entry
        else:
            runs.append(entry)
    return runs


def rebatch(latents: list[Latent], batch_size: int) -> list[Latent]:
    """Each run of same-size latents split into batches of batch_size; all-ones noise masks
    (none was set) are left out again."""
    batches = []
    for samples, masks, indices in _runs(latents):
        for start in range(0, samples.shape[0], batch_size):
            mask = masks[start:start + batch_size]
            batches.append(Latent(samples[start:start + batch_size],
                                  None if mask.mean() == 1.0 else mask,
                                  indices[start:start + batch_size]))
    return batches


class RebatchLatents(Node):
    schema = _schema("RebatchLatents", (Link("latents", "LATENT"),
                                        Int("batch_size", 1, min=1, max=4096)),
                     category="latent/batch", display_name="Rebatch Latents",
                     outputs=(Output("LATENT", is_list=True),), input_is_list=True)

    def execute(self, ctx: NodeContext, latents: list[Latent],
                batch_size: list[int]) -> tuple[list[Latent]]:
        return (rebatch([Latent.of(latent) for latent in latents], batch_size[0]),)


NODE_TYPES = (LatentAdd, LatentSubtract, LatentMultiply, LatentInterpolate, LatentConcat,
              LatentCut, LatentCutToBatch, LatentBatchSeedBehavior, BatchLatentsNode,
              RebatchLatents)
