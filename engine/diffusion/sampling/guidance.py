"""Classifier-free guidance over prepared conditioning entries, as ComfyUI computes it.

At every model evaluation each active entry (see ``conditioning.CondEntry``) yields a chunk:
the latent (cropped to its area), a weight ``mult`` (mask * mask_strength, or ones, times
strength; area edges without a mask fade in over min(8, size // 4) cells) and its model inputs.
Chunks that fit together (same crop shape, same ControlNet object, no UNet patches of their
own such as GLIGEN grounding, equal vector/concat shapes, token counts whose least common
multiple is at most 4x the shorter, the same weight hooks) run as one batch, the
cross-attention tokens repeated up to that multiple (repeating tokens leaves attention
unchanged). Each prediction's x0 is added into its side's sum with its weight, and every side
is divided by its summed weights (plus 1e-37). The result is ``uncond + (cond - uncond) *
cfg``; with cfg == 1 the uncond is not evaluated at all, except for the CFG++ samplers, which
ask for it (``GuidedModel.with_uncond``). A side without any entry (no negative prompt:
BasicGuider) predicts zeros.

ControlNets plug in through ``conditioning.ControlProvider``; the MODEL's behaviour patches
(patches/model_patches.py: model function wrapper, pre-CFG / CFG / post-CFG functions, UNet
patch points) and weight hooks (patches/hooks.py) run here too. Default entries join a batch
with the weight their side's other entries leave.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from engine.diffusion.networks.unet_patches import TransformerOptions, UNetCall, UNetPatches
from engine.diffusion.patches.hooks import HookGroup, HookSchedule
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.patches.model_patches import ModelPatches
from engine.diffusion.patches.patching import patched
from engine.diffusion.sampling import Denoiser, ModelSampling
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
    control_context: Tensor | None = None  # (B, T, D) the ControlNet's tokens, if not context
    hooks: HookGroup | None = None
    patches: UNetPatches | None = None  # the entry's own UNet patches (GLIGEN grounding)

    def fits(self, other: Chunk) -> bool:
        """Whether the two can share one UNet batch (own patches: never, as in ComfyUI)."""
        if self.x.shape != other.x.shape or self.control is not other.control:
            return False
        if self.hooks != other.hooks:
            return False
        if self.patches is not None or other.patches is not None:
            return self is other
        if not _same_shape(self.y, other.y) or not _same_shape(self.concat, other.concat):
            return False
        if (self.control_context is None) != (other.control_context is None):
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
        prepare_controls(self.model, [*positive, *(negative or ())], inputs)
        return GuidedModel(self.model, tuple(positive),
                           None if negative is None else tuple(negative), self.cfg, inputs)


def distinct_controls(entries: Sequence[CondEntry]) -> list[ControlProvider]:
    """Every distinct control object the entries carry, in order."""
    found: dict[int, ControlProvider] = {}
    for entry in entries:
        if entry.control is not None:
            found.setdefault(id(entry.control), entry.control)
    return list(found.values())


def prepare_controls(model: ModelHandle, entries: Sequence[CondEntry],
                     inputs: SamplingInputs) -> None:
    """Each distinct control's optional ``prepare(model, latent_shape)`` (engine/diffusion/
    control.py binds its start/end percents to the model's schedule there)."""
    for control in distinct_controls(entries):
        prepare = getattr(control, "prepare", None)
        if prepare is not None:
            prepare(model, inputs.noise_shape)


Sides = Sequence[Sequence[CondEntry] | None]


@dataclass(frozen=True, eq=False)
class GuidedModel:
    """``model(x, sigma) -> x0`` with classifier-free guidance: what samplers call. It is also
    the "model" the guidance patch points get (patches/model_patches.py)."""

    model: ModelHandle
    positive: tuple[CondEntry, ...]
    negative: tuple[CondEntry, ...] | None
    cfg: float
    inputs: SamplingInputs | None = None
    hook_schedule: HookSchedule | None = None

    def __post_init__(self) -> None:
        if self.hook_schedule is None:  # one per sampling run: hooks' keyframes start over
            object.__setattr__(self, "hook_schedule",
                               HookSchedule(self.model.sampling.percent_to_sigma))

    @property
    def model_sampling(self) -> ModelSampling:
        return self.model.sampling

    def prepare_conditioning(self, conditioning: Conditioning, prompt_type: str = "negative"
                             ) -> tuple[CondEntry, ...]:
        """Another CONDITIONING resolved against the latent being sampled (PerpNeg's empty
        prompt), ready for calc_cond_batch."""
        if self.inputs is None:
            raise ValueError("this guided model was made without its sampling inputs; build it "
                             "with Guider.prepare")
        return tuple(prepare_entries(self.model, conditioning, prompt_type, self.inputs))

    def cleanup(self) -> None:
        """Each distinct control's optional ``cleanup()`` (after the sampling run)."""
        cleanup_controls((*self.positive, *(self.negative or ())))

    def calc_cond_batch(self, conds: Sides, x: Tensor, sigma: Tensor,
                        model_patches: ModelPatches | None = None) -> list[Tensor]:
        """Each side's weighted x0 (ComfyUI's calc_cond_batch), under `model_patches` (default:
        the model's own; PerturbedAttentionGuidance re-runs the cond with an extra one)."""
        patches = self.model.model_patches if model_patches is None else model_patches
        sigmas = None if self.inputs is None else self.inputs.sigmas
        run_options = {} if sigmas is None else {"sample_sigmas": sigmas}
        return predict(self.model, conds, x, sigma, patches, run_options, self.hook_schedule)

    def __call__(self, x: Tensor, sigma: Tensor, **extra: object) -> Tensor:
        return self.guide(x, sigma, need_uncond=False)[0]

    def with_uncond(self, x: Tensor, sigma: Tensor, **extra: object) -> tuple[Tensor, Tensor]:
        """(guided x0, uncond x0) for the CFG++ samplers: the uncond is evaluated even at cfg 1
        (ComfyUI's disable_cfg1_optimization) and is what post-CFG functions see."""
        return self.guide(x, sigma, need_uncond=True)

    def guide(self, x: Tensor, sigma: Tensor, need_uncond: bool) -> tuple[Tensor, Tensor]:
        """(guided x0, uncond x0): both sides, pre-CFG functions, then `combine`."""
        patches = self.model.model_patches
        skip_uncond = (not need_uncond and math.isclose(self.cfg, 1.0)
                       and not patches.disable_cfg1_optimization)
        conds = [self.positive, None if skip_uncond else self.negative]
        out = self.calc_cond_batch(conds, x, sigma)
        for function in patches.sampler_pre_cfg_function:
            out = function({"conds": conds, "conds_out": out, "cond_scale": self.cfg,
                            "timestep": sigma, "input": x, "sigma": sigma, "model": self,
                            "model_options": patches})
        return self.combine(out[0], out[1], x, sigma, conds), out[1]

    def combine(self, cond_pred: Tensor, uncond_pred: Tensor, x: Tensor, sigma: Tensor,
                conds: Sides) -> Tensor:
        """uncond + (cond - uncond) * cfg, or the model's CFG function; then post-CFG ones."""
        patches = self.model.model_patches
        if patches.sampler_cfg_function is None:
            result = uncond_pred + (cond_pred - uncond_pred) * self.cfg
        else:
            result = x - patches.sampler_cfg_function({
                "cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": self.cfg,
                "timestep": sigma, "input": x, "sigma": sigma, "cond_denoised": cond_pred,
                "uncond_denoised": uncond_pred, "model": self, "model_options": patches})
        for function in patches.sampler_post_cfg_function:
            result = function({"denoised": result, "cond": conds[0], "uncond": conds[1],
                               "cond_scale": self.cfg, "model": self,
                               "uncond_denoised": uncond_pred, "cond_denoised": cond_pred,
                               "sigma": sigma, "model_options": patches, "input": x})
        return result


def cleanup_controls(entries: Sequence[CondEntry]) -> None:
    """Each distinct control's optional ``cleanup()`` (after the sampling run)."""
    for control in distinct_controls(entries):
        cleanup = getattr(control, "cleanup", None)
        if cleanup is not None:
            cleanup()


def predict(model: ModelHandle, sides: Sides, x: Tensor, sigma: Tensor,
            patches: ModelPatches | None = None,
            run_options: Mapping[str, Any] | None = None,
            hook_schedule: HookSchedule | None = None) -> list[Tensor]:
    """The weighted x0 prediction of each side (ComfyUI's calc_cond_batch)."""
    totals = [torch.zeros_like(x) for _ in sides]
    weights = [torch.ones_like(x) * EMPTY_WEIGHT for _ in sides]
    pending = [chunk for side, entries in enumerate(sides) for entry in entries or ()
               if not entry.default and (chunk := make_chunk(entry, x, sigma, side)) is not None]
    pending += default_chunks(sides, pending, x, sigma)
    while pending:
        first = pending[0]
        fitting = [index for index, chunk in enumerate(pending) if chunk.fits(first)]
        batch = [pending.pop(index) for index in reversed(fitting)]
        outputs = run_hooked_batch(model, batch, sigma, patches, run_options, hook_schedule)
        for chunk, denoised in zip(batch, outputs, strict=True):
            total, weight = totals[chunk.side], weights[chunk.side]
            if chunk.area is not None:
                total, weight = crop(total, chunk.area), crop(weight, chunk.area)
            total += denoised * chunk.mult
            weight += chunk.mult
    for total, weight in zip(totals, weights, strict=True):
        total /= weight
    return totals


def default_chunks(sides: Sides, chunks: Sequence[Chunk], x: Tensor,
                   sigma: Tensor) -> list[Chunk]:
    """Each side's default entries, weighted by what its other entries leave uncovered
    (1 - their summed weights, clipped at 0); none where nothing is left."""
    found = []
    for side, entries in enumerate(sides):
        defaults = [entry for entry in entries or () if entry.default]
        if not defaults:
            continue
        uncovered = torch.ones_like(x)
        for chunk in chunks:
            if chunk.side == side:
                region = uncovered if chunk.area is None else crop(uncovered, chunk.area)
                region -= chunk.mult
        uncovered.clamp_(min=0.0)
        if float(uncovered.max()) == 0.0:
            continue
        for entry in defaults:
            chunk = make_chunk(entry, x, sigma, side)
            if chunk is not None:
                mult = uncovered if chunk.area is None else crop(uncovered, chunk.area)
                found.append(dataclasses.replace(chunk, mult=mult))
    return found


def run_hooked_batch(model: ModelHandle, batch: Sequence[Chunk], sigma: Tensor,
                     patches: ModelPatches | None, run_options: Mapping[str, Any] | None,
                     hook_schedule: HookSchedule | None) -> tuple[Tensor, ...]:
    """run_batch with the batch's weight hooks applied at their current strengths."""
    hooks = batch[0].hooks
    if hooks is None or not hooks.hooks:
        return run_batch(model, batch, sigma, patches, run_options)
    schedule = hook_schedule or HookSchedule(model.sampling.percent_to_sigma)
    hook_patches = schedule.patches_for(hooks, model.unet, float(sigma[0]))
    with patched(model.unet, hook_patches):
        return run_batch(model, batch, sigma, patches, run_options)


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
    control_context = inputs.control_context
    if control_context is not None:
        control_context = repeat_to_batch(control_context, batch)
    own = (None if entry.grounding is None
           else entry.grounding.unet_patches(x_part.shape, x_part.device))
    return Chunk(x_part, chunk_weight(entry, x_part, area, x.shape), area,
                 repeat_to_batch(inputs.context, batch), y, concat, entry.control, side,
                 control_context, entry.hooks, own)


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


def run_batch(model: ModelHandle, batch: Sequence[Chunk], sigma: Tensor,
              patches: ModelPatches | None = None,
              run_options: Mapping[str, Any] | None = None) -> tuple[Tensor, ...]:
    """One UNet evaluation for chunks that fit together; their x0 predictions, in order.

    With behaviour patches the call gets its transformer options (cond_or_uncond, sigmas and
    the run's and the model's entries) and goes through the model function wrapper if any."""
    x = torch.cat([chunk.x for chunk in batch])
    sigmas = torch.cat([sigma] * len(batch))
    first = batch[0]
    c: dict[str, Any] = {
        "c_crossattn": _cat_tokens([chunk.context for chunk in batch]),
        "c_concat": None if first.concat is None else torch.cat(
            [chunk.concat for chunk in batch]),  # type: ignore[misc]
        "y": None if first.y is None else torch.cat([chunk.y for chunk in batch]),  # type: ignore[misc]
        "control": first.control,
        "crossattn_controlnet": None if first.control_context is None else _cat_tokens(
            [chunk.control_context for chunk in batch])}  # type: ignore[misc]
    if first.patches is not None:  # the model's patches first, then the entry's
        patches = patches or ModelPatches()
        patches = dataclasses.replace(patches, unet=patches.unet.merged(first.patches))
    if patches is None or patches.empty:
        return apply_model(model, None, x, sigmas, **c).chunk(len(batch))
    cond_or_uncond = [chunk.side for chunk in batch]
    c["transformer_options"] = {**patches.transformer_options, **(run_options or {}),
                                "cond_or_uncond": cond_or_uncond, "sigmas": sigmas}
    apply = partial(apply_model, model, patches.unet)
    if patches.model_function_wrapper is None:
        return apply(x, sigmas, **c).chunk(len(batch))
    return patches.model_function_wrapper(apply, {
        "input": x, "timestep": sigmas, "c": c, "cond_or_uncond": cond_or_uncond,
    }).chunk(len(batch))


def apply_model(model: ModelHandle, unet_patches: UNetPatches | None, x: Tensor, t: Tensor,
                c_crossattn: Tensor, c_concat: Tensor | None = None, y: Tensor | None = None,
                control: ControlProvider | None = None,
                transformer_options: TransformerOptions | None = None,
                crossattn_controlnet: Tensor | None = None) -> Tensor:
    """x0 for the noisy latent `x` at sigmas `t` (ComfyUI's apply_model, its argument names)."""
    call = None
    if unet_patches is not None and not unet_patches.empty:
        call = UNetCall(unet_patches, {} if transformer_options is None else transformer_options)
    network = partial(_network, model, c_crossattn, y, c_concat, control, t, call=call,
                      control_context=crossattn_controlnet)
    return Denoiser(network, model.sampling)(x, t)


def _cat_tokens(contexts: Sequence[Tensor]) -> Tensor:
    """Concatenate along the batch, repeating shorter token sequences to the common multiple."""
    tokens = math.lcm(*(context.shape[1] for context in contexts))
    return torch.cat([context.repeat(1, tokens // context.shape[1], 1)
                      if context.shape[1] < tokens else context for context in contexts])


def _network(model: ModelHandle, context: Tensor, y: Tensor | None, concat: Tensor | None,
             control: ControlProvider | None, sigma: Tensor, x_in: Tensor,
             timestep: Tensor, call: UNetCall | None = None,
             control_context: Tensor | None = None) -> Tensor:
    """The raw UNet output for c_in-scaled input: ControlNet residuals, inpaint channels."""
    down, mid, extra = (None, None, None)
    if control is not None:
        tokens = context if control_context is None else control_context
        down, mid = control.residuals(x_in, timestep, tokens, y, sigma)
        input_residuals = getattr(control, "input_residuals", None)  # T2I-Adapters
        if input_residuals is not None:
            extra = input_residuals(x_in, timestep, tokens, y, sigma)
    if concat is not None:
        x_in = torch.cat([x_in, concat.to(x_in.dtype)], dim=1)
    return model.unet(x_in, timestep, context, y, down_residuals=down, mid_residual=mid,
                      input_residuals=extra, call=call)
