"""Perp-Neg (Armandpour et al. 2023, "Re-imagine the Negative Prompt Algorithm"): guide away
only from the part of the negative prediction perpendicular to the positive one, both taken
relative to an empty prompt's prediction. As a model patch (PerpNeg: a CFG function that
evaluates the empty prompt itself) and as a guider (PerpNegGuider: the three predictions in one
batch, the model's pre- and post-CFG functions run around it as ComfyUI does)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from engine.diffusion.sampling.conditioning import (
    CondEntry,
    Conditioning,
    SamplingInputs,
    prepare_entries,
)
from engine.diffusion.sampling.guidance import GuidedModel, Guider


def perp_neg(x: Tensor, cond_x0: Tensor, uncond_x0: Tensor, empty_x0: Tensor, neg_scale: float,
             cond_scale: float) -> Tensor:
    """empty + cfg * (pos - neg_scale * perp), pos = cond - empty, neg = uncond - empty and
    perp = neg minus its projection on pos (one projection over the whole batch)."""
    positive = cond_x0 - empty_x0
    negative = uncond_x0 - empty_x0
    perpendicular = negative - (torch.mul(negative, positive).sum()
                                / torch.norm(positive) ** 2) * positive
    return empty_x0 + cond_scale * (positive - perpendicular * neg_scale)


def perp_neg_cfg_function(empty_conditioning: Conditioning, neg_scale: float
                          ) -> Callable[[dict[str, Any]], Tensor]:
    """The PerpNeg node's sampler_cfg_function (returns a noise prediction: x - x0)."""
    def cfg_function(args: dict[str, Any]) -> Tensor:
        model: GuidedModel = args["model"]
        x, sigma = args["input"], args["sigma"]
        empty = model.prepare_conditioning(empty_conditioning, "negative")
        (empty_x0,) = model.calc_cond_batch([empty], x, sigma, args["model_options"])
        guided = perp_neg(x, args["cond_denoised"], args["uncond_denoised"], empty_x0,
                          neg_scale, args["cond_scale"])
        return x - guided
    return cfg_function


@dataclass(frozen=True, eq=False)
class PerpNegGuider(Guider):
    """GUIDER: positive, negative and an empty prompt, guided by Perp-Neg."""

    empty_conditioning: Conditioning = ()
    neg_scale: float = 1.0

    def prepare(self, inputs: SamplingInputs) -> GuidedModel:
        guided = super().prepare(inputs)
        empty = prepare_entries(self.model, self.empty_conditioning, "negative", inputs)
        return PerpNegGuidedModel(guided.model, guided.positive, guided.negative, guided.cfg,
                                  inputs, empty=tuple(empty), neg_scale=self.neg_scale)


@dataclass(frozen=True, eq=False)
class PerpNegGuidedModel(GuidedModel):
    """PerpNegGuider's ``model(x, sigma) -> x0``."""

    empty: tuple[CondEntry, ...] = ()
    neg_scale: float = 1.0

    def __call__(self, x: Tensor, sigma: Tensor, **extra: object) -> Tensor:
        patches = self.model.model_patches
        negative, empty = self.negative, self.empty or None
        if not patches.disable_cfg1_optimization and math.isclose(self.neg_scale, 0.0):
            negative = None  # its weight is zero: not evaluated
            if math.isclose(self.cfg, 1.0):
                empty = None
        conds = [self.positive, negative, empty]
        out = self.calc_cond_batch(conds, x, sigma)
        for function in patches.sampler_pre_cfg_function:
            out = function({"conds": conds, "conds_out": out, "cond_scale": self.cfg,
                            "timestep": sigma, "input": x, "sigma": sigma, "model": self,
                            "model_options": patches})
        cond_x0, uncond_x0, empty_x0 = out[0], out[1], out[2]
        result = perp_neg(x, cond_x0, uncond_x0, empty_x0, self.neg_scale, self.cfg)
        for function in patches.sampler_post_cfg_function:
            result = function({"denoised": result, "cond": conds[0], "uncond": negative,
                               "cond_scale": self.cfg, "model": self,
                               "uncond_denoised": uncond_x0, "cond_denoised": cond_x0,
                               "sigma": sigma, "model_options": patches, "input": x,
                               "empty_cond": empty, "empty_cond_denoised": empty_x0})
        return result
