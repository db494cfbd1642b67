"""A MODEL's behaviour patches: the UNet's patch points plus the points around it that guidance
runs (model function wrapper, denoise mask, pre-CFG / CFG / post-CFG functions).

The container is typed and immutable; the callables keep ComfyUI's signatures (so a custom-node
pack's function can be passed through unchanged). A ModelHandle holds one next to its weight
patches; clones share nothing mutable, and an empty value costs nothing at sampling time.

Guidance points (`args` dicts carry ComfyUI's keys; x = the noisy latent the sampler passes,
sigma (B,), predictions are x0 "denoised" values):

* ``model_function_wrapper(apply_model, {"input": x, "timestep": sigma, "c": c,
  "cond_or_uncond": [0 | 1 per chunk]}) -> x0``, where ``apply_model(input, timestep, **c)``
  runs the model and ``c`` holds ``c_crossattn``, ``c_concat``, ``y``, ``control`` and
  ``transformer_options``.
* ``denoise_mask_function(sigma, denoise_mask, extra_options={"model", "sigmas"}) -> mask``
  (inpainting only; "sigmas" is the run's schedule).
* ``sampler_pre_cfg_function``: each ``fn({"conds", "conds_out", "cond_scale", "timestep",
  "input", "sigma", "model", "model_options"}) -> conds_out`` on the [cond, uncond] predictions.
* ``sampler_cfg_function({"cond": x - cond_x0, "uncond": x - uncond_x0, "cond_scale",
  "timestep", "input", "sigma", "cond_denoised", "uncond_denoised", "model",
  "model_options"})`` returns a noise prediction; the result is ``x - it``.
* ``sampler_post_cfg_function``: each ``fn({"denoised", "cond", "uncond", "cond_scale",
  "model", "uncond_denoised", "cond_denoised", "sigma", "model_options", "input"}) -> x0``.

"model" is the guided model being sampled (`model_sampling`, `calc_cond_batch(conds, x, sigma,
model_patches)`) and "model_options" this `ModelPatches` (sampling/guidance.py). With cfg 1 the
uncond is not evaluated (its prediction is zeros) unless `disable_cfg1_optimization` is set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any

from torch import Tensor

from engine.diffusion.networks.unet_patches import (
    AttentionReplace,
    BlockId,
    TransformerId,
    UNetPatches,
)

GuidanceArgs = dict[str, Any]
ApplyModel = Callable[..., Tensor]  # apply_model(input, timestep, **c) -> x0
ModelFunctionWrapper = Callable[[ApplyModel, GuidanceArgs], Tensor]
DenoiseMaskFunction = Callable[..., Tensor]  # (sigma, denoise_mask, extra_options=...) -> mask
PreCfgFunction = Callable[[GuidanceArgs], list[Tensor]]
CfgFunction = Callable[[GuidanceArgs], Tensor]
PostCfgFunction = Callable[[GuidanceArgs], Tensor]


def _no_options() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, eq=False)
class ModelPatches:
    """Every behaviour patch of one MODEL (module docstring); the `with_*`/`adding_*` methods
    return new values, so a node patches its clone without touching the model it was given.

    `transformer_options` holds extra entries copied into every call's options dict (what
    ComfyUI packs store in model_options["transformer_options"] besides patches)."""

    unet: UNetPatches = field(default_factory=UNetPatches)
    model_function_wrapper: ModelFunctionWrapper | None = None
    denoise_mask_function: DenoiseMaskFunction | None = None
    sampler_pre_cfg_function: tuple[PreCfgFunction, ...] = ()
    sampler_cfg_function: CfgFunction | None = None
    sampler_post_cfg_function: tuple[PostCfgFunction, ...] = ()
    disable_cfg1_optimization: bool = False
    transformer_options: Mapping[str, Any] = field(default_factory=_no_options)

    @cached_property
    def empty(self) -> bool:
        return (self.unet.empty and self.model_function_wrapper is None
                and self.denoise_mask_function is None and not self.sampler_pre_cfg_function
                and self.sampler_cfg_function is None and not self.sampler_post_cfg_function
                and not self.disable_cfg1_optimization and not self.transformer_options)

    def adding_unet_patch(self, point: str, patch: Callable[..., Any]) -> ModelPatches:
        """`patch` appended at one of the UNet's points (unet_patches.py)."""
        return dataclasses.replace(self, unet=self.unet.adding(point, patch))

    def replacing_attention(self, which: str, key: BlockId | TransformerId,
                            replace: AttentionReplace) -> ModelPatches:
        """Self- ("attn1") or cross-attention ("attn2") at `key` replaced by `replace`."""
        return dataclasses.replace(self, unet=self.unet.replacing_attention(which, key, replace))

    def with_model_function_wrapper(self, wrapper: ModelFunctionWrapper) -> ModelPatches:
        return dataclasses.replace(self, model_function_wrapper=_callable(wrapper, "wrapper"))

    def with_denoise_mask_function(self, function: DenoiseMaskFunction) -> ModelPatches:
        return dataclasses.replace(
            self, denoise_mask_function=_callable(function, "denoise mask function"))

    def adding_pre_cfg(self, function: PreCfgFunction,
                       disable_cfg1_optimization: bool = False) -> ModelPatches:
        return self._with_guidance("sampler_pre_cfg_function", function, "pre-CFG function",
                                   disable_cfg1_optimization)

    def with_cfg_function(self, function: CfgFunction,
                          disable_cfg1_optimization: bool = False) -> ModelPatches:
        return self._with_guidance("sampler_cfg_function", function, "CFG function",
                                   disable_cfg1_optimization)

    def adding_post_cfg(self, function: PostCfgFunction,
                        disable_cfg1_optimization: bool = False) -> ModelPatches:
        return self._with_guidance("sampler_post_cfg_function", function, "post-CFG function",
                                   disable_cfg1_optimization)

    def _with_guidance(self, name: str, function: Any, what: str,
                       disable_cfg1_optimization: bool) -> ModelPatches:
        """`function` set (the CFG function) or appended (pre/post lists) at `name`."""
        _callable(function, what)
        current = getattr(self, name)
        value = (*current, function) if isinstance(current, tuple) else function
        return dataclasses.replace(
            self, **{name: value},
            disable_cfg1_optimization=self.disable_cfg1_optimization or disable_cfg1_optimization)

    def with_transformer_options(self, **entries: Any) -> ModelPatches:
        """Extra entries every call's options dict starts with (later ones win)."""
        return dataclasses.replace(
            self, transformer_options=MappingProxyType({**self.transformer_options, **entries}))


def _callable(function: Any, what: str) -> Any:
    if not callable(function):
        raise TypeError(f"the {what} must be callable, got {type(function).__name__}")
    return function
