"""DualCFGGuider: two prompts guided against one negative, as ComfyUI computes it.

With x0 predictions P (cond1), M (cond2) and N (negative):

* "regular": ``N + (M - N) * cfg_cond2_negative + (P - M) * cfg_conds``. When
  cfg_cond2_negative is 1 the negative is not evaluated (its prediction counts as 0), and when
  cfg_conds is 1 as well neither is cond2.
* "nested": ``N + cfg_cond2_negative * (M + (P - M) * cfg_conds - N)``; all three are
  evaluated.

cond2 is encoded as a negative prompt (an SDXL refiner gives it the negative aesthetic
score). The inner CFG step (``M + (P - M) * cfg_conds`` in "nested", ``N + (M - N) *
cfg_cond2_negative`` in "regular") goes through the MODEL's CFG and post-CFG functions, as
ComfyUI's cfg_function; its pre-CFG functions are not called (nor are they in ComfyUI). The
CFG++ samplers take N as the unconditional x0 in "regular" and M in "nested" (what ComfyUI
hands its CFG++ hook), and then nothing is skipped at scale 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from engine.diffusion.patches.hooks import HookSchedule
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.sampling.conditioning import (
    CondEntry,
    Conditioning,
    SamplingInputs,
    pair_entry_sets,
    prepare_entries,
)
from engine.diffusion.sampling.guidance import (
    GuidedModel,
    cleanup_controls,
    predict,
    prepare_controls,
)

DUAL_CFG_STYLES: tuple[str, ...] = ("regular", "nested")


@dataclass(frozen=True, eq=False)
class DualCFGGuider:
    """GUIDER: cond1 and cond2 against a negative with two scales (module docstring)."""

    model: ModelHandle
    cond1: Conditioning
    cond2: Conditioning
    negative: Conditioning
    cfg_conds: float
    cfg_cond2_negative: float
    style: str = "regular"

    def __post_init__(self) -> None:
        if self.style not in DUAL_CFG_STYLES:
            raise ValueError(f"DualCFGGuider style {self.style!r} is not one of "
                             f"{', '.join(DUAL_CFG_STYLES)}")

    def prepare(self, inputs: SamplingInputs) -> DualGuidedModel:
        """Resolve the three prompts against the latent about to be sampled."""
        sets = [prepare_entries(self.model, self.cond1, "positive", inputs),
                prepare_entries(self.model, self.cond2, "negative", inputs),
                prepare_entries(self.model, self.negative, "negative", inputs)]
        positive, middle, negative = pair_entry_sets(sets)
        prepare_controls(self.model, [*positive, *middle, *negative], inputs)
        return DualGuidedModel(self.model, tuple(positive), tuple(middle), tuple(negative),
                               self.cfg_conds, self.cfg_cond2_negative, self.style == "nested",
                               inputs)


@dataclass(frozen=True, eq=False)
class DualGuidedModel:
    """``model(x, sigma) -> x0`` for DualCFGGuider: what samplers call."""

    model: ModelHandle
    positive: tuple[CondEntry, ...]
    middle: tuple[CondEntry, ...]
    negative: tuple[CondEntry, ...]
    cfg_conds: float
    cfg_cond2_negative: float
    nested: bool
    inputs: SamplingInputs | None = None
    hook_schedule: HookSchedule | None = None

    def __post_init__(self) -> None:
        if self.hook_schedule is None:  # one per sampling run: hooks' keyframes start over
            object.__setattr__(self, "hook_schedule",
                               HookSchedule(self.model.sampling.percent_to_sigma))

    def cleanup(self) -> None:
        cleanup_controls((*self.positive, *self.middle, *self.negative))

    def __call__(self, x: Tensor, sigma: Tensor, **extra: object) -> Tensor:
        return self._guided(x, sigma, skip_unused=True)[0]

    def with_uncond(self, x: Tensor, sigma: Tensor, **extra: object) -> tuple[Tensor, Tensor]:
        """(guided x0, the x0 CFG++ treats as unconditional), every prompt evaluated."""
        return self._guided(x, sigma, skip_unused=False)

    def _guided(self, x: Tensor, sigma: Tensor, skip_unused: bool) -> tuple[Tensor, Tensor]:
        if self.nested:
            negative, middle, positive = self._predict(x, sigma, self.negative, self.middle)
            text = self._cfg(self.positive, self.middle, self.cfg_conds).combine(
                positive, middle, x, sigma, (self.positive, self.middle))
            return negative + self.cfg_cond2_negative * (text - negative), middle
        negative_entries: tuple[CondEntry, ...] | None = self.negative
        middle_entries: tuple[CondEntry, ...] | None = self.middle
        if skip_unused and not self.model.model_patches.disable_cfg1_optimization \
                and math.isclose(self.cfg_cond2_negative, 1.0):
            negative_entries = None
            if math.isclose(self.cfg_conds, 1.0):
                middle_entries = None
        negative, middle, positive = self._predict(x, sigma, negative_entries, middle_entries)
        guided = self._cfg(middle_entries, negative_entries, self.cfg_cond2_negative).combine(
            middle, negative, x, sigma, (middle_entries, negative_entries))
        return guided + (positive - middle) * self.cfg_conds, negative

    def _cfg(self, cond: Sequence[CondEntry] | None, uncond: Sequence[CondEntry] | None,
             scale: float) -> GuidedModel:
        """A plain CFG over two of the prompts, for its combine step (CFG/post-CFG functions)."""
        return GuidedModel(self.model, tuple(cond or ()),
                           None if uncond is None else tuple(uncond), scale, self.inputs,
                           self.hook_schedule)

    def _predict(self, x: Tensor, sigma: Tensor, negative: Sequence[CondEntry] | None,
                 middle: Sequence[CondEntry] | None) -> list[Tensor]:
        """The (negative, middle, positive) x0 predictions, batched as ComfyUI orders them."""
        run_options = {} if self.inputs is None else {"sample_sigmas": self.inputs.sigmas}
        return predict(self.model, (negative, middle, self.positive), x, sigma,
                       self.model.model_patches, run_options, self.hook_schedule)
