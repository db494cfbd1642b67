"""Classifier-free guidance over prepared conditioning entries, as ComfyUI computes it.

At every model evaluation each active entry (see ``conditioning.CondEntry``) yields a chunk:
the latent (cropped to its area), a weight ``mult`` (mask * mask_strength, or ones, times
strength; area edges without a mask fade in over min(8, size // 4) cells) and its model inputs.
Chunks that fit together (same crop shape, same ControlNet object, equal vector/concat shapes,
token counts whose least common multiple is at most 4x the shorter) run as one batch, the
cross-attention tokens repeated up to that multiple (repeating tokens leaves attention
unchanged). Each prediction's x0 is added into its side's sum with its weight, and every side
is divided by its summed weights (plus 1e-37). The result is
``uncond + (cond - uncond) * cfg``; with cfg == 1 the uncond is not evaluated at all.

ControlNets plug in through ``conditioning.ControlProvider``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.sampling import Denoiser
from engine.diffusion.sampling.conditioning import (
    Area,
    CondEntry,
    Conditioning,
    ControlProvider,
    SamplingInputs,
    pair_entries,
    prepare_entries,
)
from engine.image_ops import repeat_to_batch

AREA_FADE_CELLS = 8  # an area's edges inside the latent fade in over this many cells at most
MAX_TOKEN_REPEAT = 4  # entries whose token counts need more repeats than this run separately
EMPTY_WEIGHT = 1e-37  # added to every summed weight so cells no entry covers give 0, not NaN


@dataclass(frozen=True, eq=False)
class Chunk:
    """One active entry at one model evaluation."""

    x: Tensor  # (B, C, h, w) the latent, cropped to the area
    mult: Tensor  # (B, C, h, w) the weight of this prediction
    area: Area | None
    context: Tensor  # (B, T, D)
    y: Tensor | None
    concat: Tensor | None
    control: ControlProvider | None
    side: int  # 0 = cond, 1 = uncond

    def fits(self, other: Chunk) -> bool:
        """Whether the two can share one UNet batch."""
        if self.x.shape != other.x.shape or self.control is not other.control:
            return False
        if not _same_shape(self.y, other.y) or not _same_shape(self.concat, other.concat):
            return False
        mine, theirs = self.context.shape, other.context.shape
        if mine[0] != theirs[0] or mine[2] != theirs[2]:
            return False
        return math.lcm(mine[1], theirs[1]) // min(mine[1], theirs[1]) <= MAX_TOKEN_REPEAT


def _same_shape(first: Tensor | None, second: Tensor | None) -> bool:
    if first is None or second is None:
        return first is None and second is None
    return first.shape == second.shape


@dataclass(frozen=True, eq=False)
class Guider:
    """GUIDER: a model, its prompts and the CFG scale (BasicGuider has no negative, cfg 1)."""

    model: ModelHandle
    positive: Conditioning
    negative: Conditioning | None = None
    cfg: float = 1.0

    def prepare(self, inputs: SamplingInputs) -> GuidedModel:
        """Resolve the conditioning against the latent about to be sampled."""
        positive = prepare_entries(self.model, self.positive, "positive", inputs)
        negative = None
        if self.negative is not None:
            negative = prepare_entries(self.model, self.negative, "negative", inputs)
            positive, negative = pair_entries(positive, negative)
        _prepare_controls(self.model, [*positive, *(negative or ())], inputs)
        return GuidedModel(self.model, tuple(positive),
                           None if negative is None else tuple(negative), self.cfg)


def distinct_controls(entries: Sequence[CondEntry]) -> list[ControlProvider]:
    """Every distinct control object the entries carry, in order."""
    found: dict[int, ControlProvider] = {}
    for entry in entries:
        if entry.control is not None:
            found.setdefault(id(entry.control), entry.control)
    return list(found.values())


def _prepare_controls(model: ModelHandle, entries: Sequence[CondEntry],
                      inputs: SamplingInputs) -> None:
    """Each distinct control's optional ``prepare(model, latent_shape)`` (engine/diffusion/
    control.py binds its start/end percents to the model's schedule there)."""
    for control in distinct_controls(entries):
        prepare = getattr(control, "prepare", None)
        if prepare is not None:
            prepare(model, inputs.noise_shape)


@dataclass(frozen=True, eq=False)
class GuidedModel:
    """``model(x, sigma) -> x0`` with classifier-free guidance: what samplers call."""

    model: ModelHandle
    positive: tuple[CondEntry, ...]
    negative: tuple[CondEntry, ...] | None
    cfg: float

    def cleanup(self) -> None:
        """Each distinct control's optional ``cleanup()`` (after the sampling run)."""
        for control in distinct_controls((*self.positive, *(self.negative or ()))):
            cleanup = getattr(control, "cleanup", None)
            if cleanup is not None:
                cleanup()

    def __call__(self, x: Tensor, sigma: Tensor, **extra: object) -> Tensor:
        uncond = None if math.isclose(self.cfg, 1.0) else self.negative
        cond_pred, uncond_pred = predict(self.model, (self.positive, uncond), x, sigma)
        return uncond_pred + (cond_pred - uncond_pred) * self.cfg


def predict(model: ModelHandle, sides: Sequence[Sequence[CondEntry] | None], x: Tensor,
            sigma: Tensor) -> list[Tensor]:
    """The weighted x0 prediction of each side (ComfyUI's calc_cond_batch)."""
    totals = [torch.zeros_like(x) for _ in sides]
    weights = [torch.ones_like(x) * EMPTY_WEIGHT for _ in sides]
    pending = [chunk for side, entries in enumerate(sides) for entry in entries or ()
               if (chunk := make_chunk(entry, x, sigma, side)) is not None]
    while pending:
        first = pending[0]
        fitting = [index for index, chunk in enumerate(pending) if chunk.fits(first)]
        batch = [pending.pop(index) for index in reversed(fitting)]
        for chunk, denoised in zip(batch, run_batch(model, batch, sigma), strict=True):
            total, weight = totals[chunk.side], weights[chunk.side]
            if chunk.area is not None:
                total, weight = crop(total, chunk.area), crop(weight, chunk.area)
            total += denoised * chunk.mult
            weight += chunk.mult
    for total, weight in zip(totals, weights, strict=True):
        total /= weight
    return totals


def make_chunk(entry: CondEntry, x: Tensor, sigma: Tensor, side: int) -> Chunk | None:
    """The entry's crop, weight and inputs at this evaluation, or None when it sits out."""
    if not entry.active_at(float(sigma[0])):
        return None
    area = clamp_area(entry.area, x.shape)
    if area is not None and (area[0] <= 0 or area[1] <= 0):
        return None
    x_part = x if area is None else crop(x, area)
    batch = x.shape[0]
    inputs = entry.inputs
    concat = inputs.concat
    if concat is not None:
        concat = repeat_to_batch(concat if area is None else crop(concat, area), batch)
    y = None if inputs.y is None else repeat_to_batch(inputs.y, batch)
    return Chunk(x_part, chunk_weight(entry, x_part, area, x.shape), area,
                 repeat_to_batch(inputs.context, batch), y, concat, entry.control, side)


def clamp_area(area: Area | None, shape: torch.Size) -> Area | None:
    """An area cut to fit inside the latent."""
    if area is None:
        return None
    height, width, top, left = area
    return (min(shape[2] - top, height), min(shape[3] - left, width), top, left)


def crop(values: Tensor, area: Area) -> Tensor:
    """The (.., h, w) window of an area: a view, so adding into it adds into `values`."""
    height, width, top, left = area
    return values[:, :, top:top + height, left:left + width]


def chunk_weight(entry: CondEntry, x_part: Tensor, area: Area | None,
                 full_shape: torch.Size) -> Tensor:
    """mask * mask_strength (or ones) times strength; unmasked areas get faded edges."""
    if entry.mask is None:
        mult = torch.ones_like(x_part) * entry.strength
        if area is not None:
            _fade_area_edges(mult, area, full_shape)
        return mult
    mask = entry.mask[:x_part.shape[0]]
    if area is not None:
        height, width, top, left = area
        mask = mask[:, top:top + height, left:left + width]
    mask = (mask * entry.mask_strength).unsqueeze(1)
    mask = repeat_to_batch(mask, x_part.shape[0]).repeat(1, x_part.shape[1], 1, 1)
    return mask * entry.strength


def _fade_area_edges(mult: Tensor, area: Area, full_shape: torch.Size) -> None:
    """Ramp the weight from 1/n to 1 over the n cells of each edge that lies inside the latent."""
    for axis in range(2):
        size, offset = area[axis], area[2 + axis]
        cells = min(AREA_FADE_CELLS, mult.shape[2 + axis] // 4)
        ramps = [(1.0 / cells) * (step + 1) for step in range(cells)]
        if offset != 0:
            for step, ramp in enumerate(ramps):
                mult.narrow(2 + axis, step, 1).mul_(ramp)
        if size + offset < full_shape[2 + axis]:
            for step, ramp in enumerate(ramps):
                mult.narrow(2 + axis, size - 1 - step, 1).mul_(ramp)


def run_batch(model: ModelHandle, batch: Sequence[Chunk], sigma: Tensor) -> tuple[Tensor, ...]:
    """One UNet evaluation for chunks that fit together; their x0 predictions, in order."""
    x = torch.cat([chunk.x for chunk in batch])
    sigmas = torch.cat([sigma] * len(batch))
    context = _cat_tokens([chunk.context for chunk in batch])
    first = batch[0]
    y = None if first.y is None else torch.cat([chunk.y for chunk in batch])  # type: ignore[misc]
    concat = None
    if first.concat is not None:
        concat = torch.cat([chunk.concat for chunk in batch])  # type: ignore[misc]
    network = partial(_network, model, context, y, concat, first.control, sigmas)
    return Denoiser(network, model.sampling)(x, sigmas).chunk(len(batch))


def _cat_tokens(contexts: Sequence[Tensor]) -> Tensor:
    """Concatenate along the batch, repeating shorter token sequences to the common multiple."""
    tokens = math.lcm(*(context.shape[1] for context in contexts))
    return torch.cat([context.repeat(1, tokens // context.shape[1], 1)
                      if context.shape[1] < tokens else context for context in contexts])


def _network(model: ModelHandle, context: Tensor, y: Tensor | None, concat: Tensor | None,
             control: ControlProvider | None, sigma: Tensor, x_in: Tensor,
             timestep: Tensor) -> Tensor:
    """The raw UNet output for c_in-scaled input: ControlNet residuals, inpaint channels."""
    down, mid, extra = (None, None, None)
    if control is not None:
        down, mid = control.residuals(x_in, timestep, context, y, sigma)
        input_residuals = getattr(control, "input_residuals", None)  # T2I-Adapters
        if input_residuals is not None:
            extra = input_residuals(x_in, timestep, context, y, sigma)
    if concat is not None:
        x_in = torch.cat([x_in, concat.to(x_in.dtype)], dim=1)
    return model.unet(x_in, timestep, context, y, down_residuals=down, mid_residual=mid,
                      input_residuals=extra)
