"""SIGMAS nodes of custom sampling: schedulers (sampling/custom_sampling/schedulers) and the
tools that cut, flip, extend or write a schedule (sampling/custom_sampling/sigmas).

SIGMAS is a descending 1-D float32 tensor on the CPU, usually ending in 0."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor

from engine.context import NodeContext
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.sampling import (
    SCHEDULER_NAMES,
    exponential,
    karras,
    laplace,
    polyexponential,
    schedulers,
    sd_turbo,
    vp,
)
from engine.diffusion.sampling.ksampler import default_sigmas
from engine.diffusion.sampling.tuned_schedules import (
    ALIGN_YOUR_STEPS,
    GITS_COEFFS,
    OPTIMAL_STEPS,
    align_your_steps,
    gits,
    optimal_steps,
)
from engine.node import Boolean, Combo, Float, Input, Int, Link, Node, NodeSchema, Output, String
from nodes.sampling import require_model, steps_input

SCHEDULERS = "sampling/custom_sampling/schedulers"
SIGMAS = "sampling/custom_sampling/sigmas"
FLIPPED_ZERO_SIGMA = 0.0001  # FlipSigmas: a schedule may not start at sigma 0
SPACINGS = ("linear", "cosine", "sine")  # ExtendIntermediateSigmas' interpolation curves
# ManualSigmas reads every number in its text: optional sign, digits, optional decimals.
NUMBER = re.compile(r"[-+]?(?:\d*\.*\d+)")


def _sigma_range(name: str) -> Input:
    return Float(name, 14.614642 if name == "sigma_max" else 0.0291675, min=0.0, max=5000.0,
                 step=0.01, round=False)


def _rho(default: float) -> Input:
    return Float("rho", default, min=0.0, max=100.0, step=0.01, round=False)


def _denoise() -> Input:
    return Float("denoise", 1.0, min=0.0, max=1.0, step=0.01)


def _scheduler(name: str, inputs: tuple[Input, ...]) -> NodeSchema:
    return NodeSchema(name, inputs, (Output("SIGMAS"),), category=SCHEDULERS)


def _split(name: str, inputs: tuple[Input, ...]) -> NodeSchema:
    return NodeSchema(name, inputs, (Output("SIGMAS", "high_sigmas"),
                                     Output("SIGMAS", "low_sigmas")), category=SIGMAS)


class BasicScheduler(Node):
    schema = _scheduler("BasicScheduler",
                        (Link("model", "MODEL"),
                         Combo("scheduler", SCHEDULER_NAMES, combo_style="v3"), steps_input(),
                         _denoise()))

    def execute(self, ctx: NodeContext, model: ModelHandle, scheduler: str, steps: int,
                denoise: float) -> tuple[Tensor]:
        model = require_model(model, "BasicScheduler")
        return (default_sigmas(model, scheduler, steps, denoise),)


class KarrasScheduler(Node):
    schema = _scheduler("KarrasScheduler", (steps_input(), _sigma_range("sigma_max"),
                                            _sigma_range("sigma_min"), _rho(7.0)))

    def execute(self, ctx: NodeContext, steps: int, sigma_max: float, sigma_min: float,
                rho: float) -> tuple[Tensor]:
        return (karras(steps, sigma_min, sigma_max, rho),)


class ExponentialScheduler(Node):
    schema = _scheduler("ExponentialScheduler", (steps_input(), _sigma_range("sigma_max"),
                                                 _sigma_range("sigma_min")))

    def execute(self, ctx: NodeContext, steps: int, sigma_max: float,
                sigma_min: float) -> tuple[Tensor]:
        return (exponential(steps, sigma_min, sigma_max),)


class PolyexponentialScheduler(Node):
    schema = _scheduler("PolyexponentialScheduler", (steps_input(), _sigma_range("sigma_max"),
                                                     _sigma_range("sigma_min"), _rho(1.0)))

    def execute(self, ctx: NodeContext, steps: int, sigma_max: float, sigma_min: float,
                rho: float) -> tuple[Tensor]:
        return (polyexponential(steps, sigma_min, sigma_max, rho),)


class LaplaceScheduler(Node):
    schema = _scheduler("LaplaceScheduler",
                        (steps_input(), _sigma_range("sigma_max"), _sigma_range("sigma_min"),
                         Float("mu", 0.0, min=-10.0, max=10.0, step=0.1, round=False),
                         Float("beta", 0.5, min=0.0, max=10.0, step=0.1, round=False)))

    def execute(self, ctx: NodeContext, steps: int, sigma_max: float, sigma_min: float,
                mu: float, beta: float) -> tuple[Tensor]:
        """steps sigmas from sigma_max to sigma_min, with no final 0 (as ComfyUI's)."""
        return (laplace(steps, sigma_min, sigma_max, mu, beta),)


class VPScheduler(Node):
    schema = _scheduler("VPScheduler",
                        (steps_input(),
                         Float("beta_d", 19.9, min=0.0, max=5000.0, step=0.01, round=False),
                         Float("beta_min", 0.1, min=0.0, max=5000.0, step=0.01, round=False),
                         Float("eps_s", 0.001, min=0.0, max=1.0, step=0.0001, round=False)))

    def execute(self, ctx: NodeContext, steps: int, beta_d: float, beta_min: float,
                eps_s: float) -> tuple[Tensor]:
        return (vp(steps, beta_d, beta_min, eps_s),)


class BetaSamplingScheduler(Node):
    schema = _scheduler("BetaSamplingScheduler",
                        (Link("model", "MODEL"), steps_input(),
                         Float("alpha", 0.6, min=0.0, max=50.0, step=0.01, round=False),
                         Float("beta", 0.6, min=0.0, max=50.0, step=0.01, round=False)))

    def execute(self, ctx: NodeContext, model: ModelHandle, steps: int, alpha: float,
                beta: float) -> tuple[Tensor]:
        model = require_model(model, "BetaSamplingScheduler")
        return (schedulers.beta(model.sampling, steps, alpha, beta),)


class SDTurboScheduler(Node):
    schema = _scheduler("SDTurboScheduler",
                        (Link("model", "MODEL"), Int("steps", 1, min=1, max=10),
                         Float("denoise", 1.0, min=0, max=1.0, step=0.01)))

    def execute(self, ctx: NodeContext, model: ModelHandle, steps: int,
                denoise: float) -> tuple[Tensor]:
        model = require_model(model, "SDTurboScheduler")
        return (sd_turbo(model.sampling, steps, denoise).cpu(),)


class AlignYourStepsScheduler(Node):
    schema = _scheduler("AlignYourStepsScheduler",
                        (Combo("model_type", tuple(ALIGN_YOUR_STEPS), combo_style="v3"),
                         Int("steps", 10, min=1, max=10000), _denoise()))

    def execute(self, ctx: NodeContext, model_type: str, steps: int,
                denoise: float) -> tuple[Tensor]:
        return (align_your_steps(model_type, steps, denoise),)


class GITSScheduler(Node):
    schema = _scheduler("GITSScheduler",
                        (Float("coeff", 1.2, min=0.8, max=1.5, step=0.05),
                         Int("steps", 10, min=2, max=1000), _denoise()))

    def validate(self, ctx: NodeContext, **inputs: Any) -> tuple[str, str] | None:
        coeff = inputs.get("coeff")
        if isinstance(coeff, (int, float)) and round(coeff, 2) not in GITS_COEFFS:
            return ("coeff", f"GITS publishes schedules for coeff "
                             f"{', '.join(f'{c:.2f}' for c in GITS_COEFFS)} only, got {coeff}; "
                             f"pick one of those (steps of 0.05)")
        return None

    def execute(self, ctx: NodeContext, coeff: float, steps: int,
                denoise: float) -> tuple[Tensor]:
        return (gits(coeff, steps, denoise),)


class OptimalStepsScheduler(Node):
    schema = _scheduler("OptimalStepsScheduler",
                        (Combo("model_type", tuple(OPTIMAL_STEPS), combo_style="v3"),
                         Int("steps", 20, min=3, max=1000), _denoise()))

    def execute(self, ctx: NodeContext, model_type: str, steps: int,
                denoise: float) -> tuple[Tensor]:
        """Flow-model schedules (sigmas from 1 to 0); Loom runs no such model."""
        return (optimal_steps(model_type, steps, denoise),)


class SplitSigmas(Node):
    schema = _split("SplitSigmas", (Link("sigmas", "SIGMAS"), Int("step", 0, min=0, max=10000)))

    def execute(self, ctx: NodeContext, sigmas: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Steps before `step` and from `step` on; both halves hold sigmas[step]."""
        return (sigmas[:step + 1], sigmas[step:])


class SplitSigmasDenoise(Node):
    schema = _split("SplitSigmasDenoise", (Link("sigmas", "SIGMAS"), _denoise()))

    def execute(self, ctx: NodeContext, sigmas: Tensor, denoise: float) -> tuple[Tensor, Tensor]:
        """The last round(steps * denoise) steps are the low part; the high part ends where it
        starts (denoise 0 leaves the high part empty and the low part the final sigma, as
        ComfyUI's)."""
        steps = max(sigmas.shape[-1] - 1, 0)
        low_steps = round(steps * denoise)
        return (sigmas[:-low_steps], sigmas[-(low_steps + 1):])


class FlipSigmas(Node):
    schema = NodeSchema("FlipSigmas", (Link("sigmas", "SIGMAS"),), (Output("SIGMAS"),),
                        category=SIGMAS)

    def execute(self, ctx: NodeContext, sigmas: Tensor) -> tuple[Tensor]:
        """The schedule reversed (for unsampling); a leading 0 becomes 0.0001."""
        if len(sigmas) == 0:
            return (sigmas,)
        flipped = sigmas.flip(0)
        if flipped[0] == 0:
            flipped[0] = FLIPPED_ZERO_SIGMA
        return (flipped,)


class SetFirstSigma(Node):
    schema = NodeSchema("SetFirstSigma",
                        (Link("sigmas", "SIGMAS"),
                         Float("sigma", 136.0, min=0.0, max=20000.0, step=0.001, round=False)),
                        (Output("SIGMAS"),), category=SIGMAS)

    def execute(self, ctx: NodeContext, sigmas: Tensor, sigma: float) -> tuple[Tensor]:
        if len(sigmas) == 0:
            raise ValueError("SetFirstSigma: the sigmas input is empty; connect a schedule "
                             "with at least one sigma")
        changed = sigmas.clone()
        changed[0] = sigma
        return (changed,)


class ExtendIntermediateSigmas(Node):
    schema = NodeSchema("ExtendIntermediateSigmas",
                        (Link("sigmas", "SIGMAS"), Int("steps", 2, min=1, max=100),
                         Float("start_at_sigma", -1.0, min=-1.0, max=20000.0, step=0.01,
                               round=False),
                         Float("end_at_sigma", 12.0, min=0.0, max=20000.0, step=0.01,
                               round=False),
                         Combo("spacing", SPACINGS, combo_style="v3")),
                        (Output("SIGMAS"),), category=SIGMAS)

    def execute(self, ctx: NodeContext, sigmas: Tensor, steps: int, start_at_sigma: float,
                end_at_sigma: float, spacing: str) -> tuple[Tensor]:
        """Each step whose first sigma lies in [end_at_sigma, start_at_sigma] (start < 0: no
        upper limit) is cut into `steps` steps, spaced along the chosen curve."""
        return (extend_intermediate(sigmas, steps, start_at_sigma, end_at_sigma, spacing),)


def extend_intermediate(sigmas: Tensor, steps: int, start_at_sigma: float,
                        end_at_sigma: float, spacing: str) -> Tensor:
    upper = math.inf if start_at_sigma < 0 else start_at_sigma
    fractions = torch.linspace(0, 1, steps + 1, device=sigmas.device)[1:-1]
    if spacing == "cosine":
        fractions = torch.sin(fractions * math.pi / 2)
    elif spacing == "sine":
        fractions = 1 - torch.cos(fractions * math.pi / 2)
    elif spacing != "linear":
        raise ValueError(f"spacing {spacing!r} is not one of {', '.join(SPACINGS)}")
    extended: list[float] = []
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        extended.append(float(sigma))
        if end_at_sigma <= sigma <= upper:
            extended.extend((fractions * (sigma_next - sigma) + sigma).tolist())
    if len(sigmas) > 0:
        extended.append(float(sigmas[-1]))
    return torch.FloatTensor(extended)


class SamplingPercentToSigma(Node):
    schema = NodeSchema("SamplingPercentToSigma",
                        (Link("model", "MODEL"),
                         Float("sampling_percent", 0.0, min=0.0, max=1.0, step=0.0001),
                         Boolean("return_actual_sigma", False)),
                        (Output("FLOAT", "sigma_value"),), category=SIGMAS)

    def execute(self, ctx: NodeContext, model: ModelHandle, sampling_percent: float,
                return_actual_sigma: bool) -> tuple[float]:
        """The sigma at a point of sampling. At 0 and 1 the value used for range checks is
        999999999.9 and 0; return_actual_sigma gives sigma_max and sigma_min there instead."""
        sampling = require_model(model, "SamplingPercentToSigma").sampling
        if return_actual_sigma and sampling_percent == 0.0:
            return (float(sampling.sigma_max),)
        if return_actual_sigma and sampling_percent == 1.0:
            return (float(sampling.sigma_min),)
        return (sampling.percent_to_sigma(sampling_percent),)


class ManualSigmas(Node):
    schema = NodeSchema("ManualSigmas",
                        (String("sigmas", "1, 0.5", options={"multiline": False}),),
                        (Output("SIGMAS"),), category="_for_testing/custom_sampling",
                        experimental=True)

    def execute(self, ctx: NodeContext, sigmas: str) -> tuple[Tensor]:
        """Every number in the text, in order (any separators)."""
        values = []
        for text in NUMBER.findall(sigmas):
            try:
                values.append(float(text))
            except ValueError:
                raise ValueError(f"ManualSigmas: {text!r} in the sigmas text is not a number; "
                                 f"write the sigmas like \"14.6, 7.5, 0\"") from None
        return (torch.FloatTensor(values),)


NODE_TYPES = (BasicScheduler, KarrasScheduler, ExponentialScheduler, PolyexponentialScheduler,
              LaplaceScheduler, VPScheduler, BetaSamplingScheduler, SDTurboScheduler,
              AlignYourStepsScheduler, GITSScheduler, OptimalStepsScheduler, SplitSigmas,
              SplitSigmasDenoise, FlipSigmas, SetFirstSigma, ExtendIntermediateSigmas,
              SamplingPercentToSigma, ManualSigmas)
