"""ComfyUI's `comfy.samplers` for custom-node packs: sampler and scheduler names, SAMPLER
objects (Loom's SamplerChoice), schedules, KSampler and CFGGuider over Loom's sampling."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from loom_pack_sampling import (
    PackGuider,
    calc_cond_batch,
    cfg_function,
    pack_sampler,
    sampler_object_run,
    sampling_function,
)
from torch import Tensor

from comfy.k_diffusion import sampling as k_diffusion_sampling
from engine.comfy_host import from_pack
from engine.diffusion.sampling import (
    COMFYUI_SAMPLER_NAMES,
    SamplerOptions,
    sigmas_for,
    step_range,
)
from engine.diffusion.sampling import (
    SAMPLER_NAMES as IMPLEMENTED,
)
from engine.diffusion.sampling import (
    SCHEDULER_NAMES as LOOM_SCHEDULER_NAMES,
)
from engine.diffusion.sampling import calculate_sigmas as loom_calculate_sigmas
from engine.diffusion.sampling.guidance import Guider
from engine.diffusion.sampling.ksampler import SamplerChoice, guided_sample
from engine.values import Latent

KSAMPLER_NAMES = list(COMFYUI_SAMPLER_NAMES)
SAMPLER_NAMES = list(COMFYUI_SAMPLER_NAMES)  # ComfyUI's names (combos); IMPLEMENTED runs
SCHEDULER_NAMES = list(LOOM_SCHEDULER_NAMES)
# ComfyUI's sampling internals; Loom's guidance and sampling loop are its own.
INTERNALS = ("KSamplerX0Inpaint", "get_area_and_mult", "can_concat_cond", "cond_cat",
             "CFGNoisePredictor",
             "KSamplerInpaint", "process_conds", "encode_model_conds",
             "resolve_areas_and_cond_masks",
             "calculate_start_end_timesteps", "pre_run_control", "apply_empty_x_to_equal_area",
             "sampler_names", "SchedulerHandler", "normal_scheduler", "simple_scheduler",
             "beta_scheduler", "ddim_scheduler", "sgm_scheduler")
__all__ = ["CFGGuider", "KSAMPLER", "KSampler", "Sampler", "calc_cond_batch",
           "calculate_sigmas", "cfg_function", "k_diffusion_sampling", "ksampler",
           "sampler_object", "sampling_function"]


def __getattr__(name: str) -> Any:
    if name in INTERNALS:
        from loom_internals import unavailable
        return unavailable(f"comfy.samplers.{name}")
    raise AttributeError(f"comfy.samplers has no {name!r} in Loom's facade")
SCHEDULER_HANDLERS: dict[str, Any] = {name: name for name in LOOM_SCHEDULER_NAMES}
SAMPLER_OPTION_NAMES = frozenset(SamplerOptions.__dataclass_fields__)


def _unsupported(name: str) -> NotImplementedError:
    return NotImplementedError(f"comfy.samplers: sampler {name!r} is not implemented in Loom; "
                               f"use one of {', '.join(IMPLEMENTED)}")


class Sampler:
    """Base of ComfyUI's SAMPLER objects: a pack's subclass defines ``sample(model_wrap, sigmas,
    extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False)``
    and runs as a Loom SAMPLER that does the whole sampling (loom_pack_sampling.py)."""

    def sample(self, model_wrap: Any, sigmas: Tensor, extra_args: Any, callback: Any,
               noise: Tensor, latent_image: Tensor | None = None,
               denoise_mask: Tensor | None = None, disable_pbar: bool = False) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not define sample(); a "
                                  f"comfy.samplers.Sampler subclass must")

    def max_denoise(self, model_wrap: Any, sigmas: Tensor) -> bool:
        """Whether sigmas[0] is the model's largest sigma (the noise is then scaled as pure)."""
        sampling = model_wrap.inner_model.model_sampling
        return bool(sampling.is_max_denoise(float(sigmas[0])))

    def loom_value(self) -> SamplerChoice:
        if type(self).sample is Sampler.sample:
            raise NotImplementedError(f"{type(self).__name__} does not define sample(); a "
                                      f"comfy.samplers.Sampler subclass must")
        return SamplerChoice(type(self).__name__, whole_run=sampler_object_run(self))


def KSAMPLER(sampler_function: Callable[..., Any], extra_options: Mapping[str, Any] | None = None,
             inpaint_options: Mapping[str, Any] | None = None) -> SamplerChoice:
    """A SAMPLER for a k-diffusion-style function: one of comfy.k_diffusion.sampling's (Loom's
    sampler, with its options), or a pack's own, run inside Loom's sampling with
    `extra_options` as its keyword arguments (comfy_compat/loom_pack_sampling.py)."""
    name = getattr(sampler_function, "loom_sampler_name", None)
    if name is None:
        if not callable(sampler_function):
            raise TypeError(f"comfy.samplers.KSAMPLER: sampler_function is "
                            f"{type(sampler_function).__name__}; pass a function f(model, x, "
                            f"sigmas, extra_args=None, callback=None, disable=None, **options)")
        label = getattr(sampler_function, "__name__", type(sampler_function).__name__)
        random = bool((inpaint_options or {}).get("random", False))
        return SamplerChoice(label, built=pack_sampler(label, sampler_function,
                                                       extra_options or {}, random))
    options = {k: v for k, v in (extra_options or {}).items() if k in SAMPLER_OPTION_NAMES}
    return SamplerChoice(name, SamplerOptions(**options))


def ksampler(sampler_name: str, extra_options: Mapping[str, Any] | None = None,
             inpaint_options: Mapping[str, Any] | None = None) -> SamplerChoice:
    if sampler_name not in IMPLEMENTED:
        raise _unsupported(sampler_name)
    options = {k: v for k, v in (extra_options or {}).items() if k in SAMPLER_OPTION_NAMES}
    return SamplerChoice(sampler_name, SamplerOptions(**options))


def sampler_object(name: str) -> SamplerChoice:
    return ksampler(name)


def calculate_sigmas(model_sampling: Any, scheduler_name: str, steps: int) -> Tensor:
    return loom_calculate_sigmas(model_sampling, scheduler_name, steps)


def step_callback(callback: Callable[..., Any] | None, total: int) -> Any:
    """Loom's step progress as ComfyUI's callback(step, x0, x, total_steps)."""
    if callback is None:
        return None

    def progress(done: int, steps: int, denoised: Tensor) -> None:
        callback(done - 1, denoised, None, steps)

    return progress


class CFGGuider:
    """GUIDER for packs: a model, its prompts and the CFG scale (Loom's Guider underneath).
    A subclass overriding predict_noise runs its own guidance (loom_pack_sampling.py): while
    it samples, `conds` holds the resolved prompts and `inner_model` Loom's guided model."""

    def __init__(self, model_patcher: Any) -> None:
        self.model_patcher = model_patcher
        self.model_options = getattr(model_patcher, "model_options", {})
        self.original_conds: dict[str, Any] = {}
        self.conds: dict[str, Any] = {}
        self.inner_model: Any = None
        self.cfg = 1.0

    def set_conds(self, positive: Any, negative: Any = None) -> None:
        prompts = {"positive": positive}
        if negative is not None:
            prompts["negative"] = negative
        self.inner_set_conds(prompts)

    def inner_set_conds(self, conds: Mapping[str, Any]) -> None:
        """Set prompts by name (a pack's guider may use more than positive and negative)."""
        self.original_conds.update(conds)

    def set_cfg(self, cfg: float) -> None:
        self.cfg = cfg

    def loom_value(self) -> Guider | PackGuider:
        if "positive" not in self.original_conds:
            raise ValueError(f"{type(self).__name__}: no positive prompt; call set_conds(...) "
                             f"before sampling")
        if type(self).predict_noise is not CFGGuider.predict_noise:
            return PackGuider(self, from_pack(self.model_patcher))
        return Guider(from_pack(self.model_patcher), self.original_conds["positive"],
                      self.original_conds.get("negative"), self.cfg)

    def predict_noise(self, x: Tensor, timestep: Tensor, model_options: Any = None,
                      seed: Any = None) -> Tensor:
        """CFG of the positive prompt against the negative (ComfyUI's: an x0)."""
        return sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                 self.conds.get("positive"), self.cfg, model_options, seed)

    def sample(self, noise: Tensor, latent_image: Tensor, sampler: Any, sigmas: Tensor,
               denoise_mask: Tensor | None = None, callback: Any = None,
               disable_pbar: bool = False, seed: int | None = None) -> Tensor:
        latent = Latent(latent_image, noise_mask=denoise_mask)
        result = guided_sample(self.loom_value(), from_pack(sampler), sigmas, noise, latent,
                               seed=seed or 0, progress=step_callback(callback, len(sigmas) - 1))
        return result.samples


class KSampler:
    """ComfyUI's KSampler object: a model with a sampler, scheduler and step count."""

    SCHEDULERS = list(LOOM_SCHEDULER_NAMES)
    SAMPLERS = list(COMFYUI_SAMPLER_NAMES)
    DISCARD_PENULTIMATE_SIGMA_SAMPLERS = {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}

    def __init__(self, model: Any, steps: int, device: Any, sampler: str | None = None,
                 scheduler: str | None = None, denoise: float | None = None,
                 model_options: Any = None) -> None:
        self.model = model
        self.device = device
        self.sampler = sampler or "euler"
        self.scheduler = scheduler or "normal"
        self.steps = steps
        self.denoise = 1.0 if denoise is None else denoise
        handle = from_pack(model)
        self.sigmas = sigmas_for(handle.sampling, self.scheduler, steps, self.denoise,
                                 sampler_name=self.sampler)

    def sample(self, noise: Tensor, positive: Any, negative: Any, cfg: float,
               latent_image: Tensor | None = None, start_step: int | None = None,
               last_step: int | None = None, force_full_denoise: bool = False,
               denoise_mask: Tensor | None = None, sigmas: Tensor | None = None,
               callback: Any = None, disable_pbar: bool = False, seed: int | None = None
               ) -> Tensor:
        chosen = step_range(self.sigmas if sigmas is None else sigmas, start_step, last_step,
                            force_full_denoise)
        image = torch.zeros_like(noise) if latent_image is None else latent_image
        if chosen is None:
            return image
        guider = CFGGuider(self.model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return guider.sample(noise, image, ksampler(self.sampler), chosen, denoise_mask,
                             callback, disable_pbar, seed)
