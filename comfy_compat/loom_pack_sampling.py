"""Packs' own sampling code inside Loom's sampling run (comfy.samplers' facade uses these):

* a k-diffusion-style sampler function ``f(model, x, sigmas, extra_args=None, callback=None,
  disable=None, **options)`` given to ``comfy.samplers.KSAMPLER`` runs as a Loom sampler. Its
  ``model(x, sigma, **extra_args)`` is Loom's guided denoiser (CFG, the MODEL's patches, the
  inpainting mask), returning x0; ``extra_args`` carries the ``seed`` (for
  ``default_noise_sampler``); its callback dict (``i``, ``x``, ``denoised``, ``sigma``) reaches
  Loom's progress and previews; the KSAMPLER's extra options are its keyword arguments.
  ``model.inner_model.inner_model.model_sampling`` and ``model.inner_model.model_patcher``
  are there as in ComfyUI.
* a ``comfy.samplers.Sampler`` subclass with its own ``sample(...)`` runs the whole sampling
  itself (noise scaling, masking, its steps) over the same guided denoiser;
* a ``comfy.samplers.CFGGuider`` subclass overriding ``predict_noise`` runs as a Loom GUIDER:
  during the run its ``conds`` hold each prompt resolved against the latent and its
  ``inner_model`` is Loom's guided model, which ``sampling_function``, ``calc_cond_batch`` and
  ``cfg_function`` take as their model. The MODEL's own patches apply there; the
  ``model_options`` dict handed to predict_noise is ComfyUI's shape for reading, not re-read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from engine.comfy_host import from_pack, to_pack
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.sampling import SamplerOptions
from engine.diffusion.sampling.conditioning import (
    CondEntry,
    SamplingInputs,
    pair_entry_sets,
    prepare_entries,
)
from engine.diffusion.sampling.guidance import GuidedModel, prepare_controls
from engine.diffusion.sampling.noise import NoiseSource
from engine.diffusion.sampling.samplers import SamplerSpec
from engine.diffusion.sampling.samplers_common import Callback


class PackSamplingError(TypeError):
    """A pack called a sampling helper with something Loom cannot sample with."""


# -- pack sampler functions -------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class GuiderView:
    """ComfyUI's CFGGuider as a sampler function sees it (`model.inner_model`)."""

    handle: ModelHandle

    @property
    def inner_model(self) -> Any:
        return self.model_patcher.model

    @property
    def model_patcher(self) -> Any:
        return to_pack(self.handle)

    @property
    def model_sampling(self) -> Any:
        return self.inner_model.model_sampling


@dataclass(frozen=True, eq=False)
class PackSamplerModel:
    """The `model` a pack's sampler function calls: x0 from Loom's guided denoiser."""

    denoiser: Callable[..., Tensor]
    inner_model: GuiderView

    def __call__(self, x: Tensor, sigma: Tensor, **extra_args: Any) -> Tensor:
        # ComfyUI's model wrapper takes denoise_mask, model_options and seed: Loom's denoiser
        # already holds the mask and the MODEL's options
        return self.denoiser(x, sigma)


def model_handle(denoiser: Any) -> ModelHandle:
    """The MODEL under a denoiser (a guided model, possibly inside the inpainting wrapper)."""
    current = denoiser
    while not isinstance(getattr(current, "model", None), ModelHandle):
        current = getattr(current, "inner", None)
        if current is None:
            raise PackSamplingError(f"cannot find the MODEL of denoiser {denoiser!r}")
    return current.model


def pack_sampler(name: str, function: Callable[..., Tensor],
                 extra_options: Mapping[str, Any], random_inpaint: bool) -> SamplerSpec:
    """A pack's k-diffusion-style function as a Loom sampler (module docstring)."""
    keywords = dict(extra_options)

    def run(model: Callable[..., Tensor], x: Tensor, sigmas: Tensor, *,
            extra_args: Mapping[str, object], callback: Callback | None, noise: NoiseSource,
            options: SamplerOptions) -> Tensor:
        wrapped = PackSamplerModel(model, GuiderView(model_handle(model)))
        args = {**extra_args, "seed": getattr(noise, "seed", None), "model_options": {}}
        return function(wrapped, x, sigmas, extra_args=args, callback=step_reporter(callback),
                        disable=None, **keywords)

    return SamplerSpec(name, run, random_inpaint_noise=random_inpaint)


def sampler_object_run(sampler: Any) -> Callable[..., Tensor]:
    """A pack's comfy.samplers.Sampler as a SamplerChoice's whole_run: its
    ``sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
    disable_pbar)`` gets the guided denoiser (``inner_model.model_sampling`` included), the raw
    noise and the model-space latent, scales the noise and handles the mask itself, and calls
    ``callback(step, x0, x, total_steps)``, as ComfyUI's contract says."""
    def run(denoiser: Callable[..., Tensor], sigmas: Tensor, noise: Tensor, latent_image: Tensor,
            denoise_mask: Tensor | None, callback: Callback, seed: int) -> Tensor:
        model_wrap = PackSamplerModel(denoiser, GuiderView(model_handle(denoiser)))

        def report(step: int, x0: Tensor, x: Tensor, total_steps: int) -> None:
            callback(int(step), x, x0, sigmas[min(int(step), len(sigmas) - 1)])

        return sampler.sample(model_wrap, sigmas, {"model_options": {}, "seed": seed}, report,
                              noise, latent_image, denoise_mask, False)

    return run


def step_reporter(callback: Callback | None) -> Callable[[dict[str, Any]], None] | None:
    """k-diffusion's callback(dict) as Loom's callback(step, x, denoised, sigma)."""
    if callback is None:
        return None

    def report(step: dict[str, Any]) -> None:
        callback(int(step["i"]), step["x"], step["denoised"], step.get("sigma"))

    return report


# -- pack guiders -------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PackGuider:
    """GUIDER: a pack's CFGGuider subclass whose predict_noise combines the predictions."""

    guider: Any  # the pack's comfy.samplers.CFGGuider
    model: ModelHandle

    def prepare(self, inputs: SamplingInputs) -> PackGuidedModel:
        """Resolve every prompt of the guider against the latent (the positive one as a
        positive prompt, the others as negatives), then bind them to the guider."""
        original = dict(self.guider.original_conds)
        sets = pair_entry_sets([prepare_entries(self.model, from_pack(cond),
                                                "positive" if name == "positive" else "negative",
                                                inputs) for name, cond in original.items()])
        prepared = {name: tuple(entries) for name, entries in zip(original, sets, strict=True)}
        prepare_controls(self.model, [e for entries in sets for e in entries], inputs)
        guided = GuidedModel(self.model, prepared.get("positive", ()), prepared.get("negative"),
                             float(self.guider.cfg), inputs)
        bound = PackGuidedModel(self.guider, guided, inputs.seed)
        self.guider.conds, self.guider.inner_model = prepared, guided
        return bound


@dataclass(frozen=True, eq=False)
class PackGuidedModel:
    """What samplers call for a PackGuider: the guider's predict_noise (an x0, despite its
    name, as in ComfyUI)."""

    guider: Any
    guided: GuidedModel
    seed: int
    model_options: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> ModelHandle:
        return self.guided.model

    def __call__(self, x: Tensor, sigma: Tensor, **extra: object) -> Tensor:
        return self.guider.predict_noise(x, sigma, model_options=self.model_options,
                                         seed=self.seed)

    def with_uncond(self, x: Tensor, sigma: Tensor, **extra: object) -> tuple[Tensor, Tensor]:
        """The guider's x0 and the negative prompt's (for the CFG++ samplers)."""
        (uncond,) = self.guided.calc_cond_batch([self.guided.negative], x, sigma)
        return self(x, sigma), uncond

    def cleanup(self) -> None:
        self.guided.cleanup()
        self.guider.conds, self.guider.inner_model = {}, None


# -- comfy.samplers' prediction helpers ---------------------------------------------------------
def guided_model(model: Any, what: str) -> GuidedModel:
    if isinstance(model, GuidedModel):
        return model
    raise PackSamplingError(f"comfy.samplers.{what}: model is {type(model).__name__}; pass the "
                            f"guider's inner_model while it samples (Loom's guided model)")


def entries(guided: GuidedModel, cond: Any) -> tuple[CondEntry, ...] | None:
    """A prompt as resolved entries: the guider's own `conds` already are; a CONDITIONING is
    resolved against the latent being sampled."""
    if cond is None:
        return None
    if all(isinstance(entry, CondEntry) for entry in cond):
        return tuple(cond)
    return guided.prepare_conditioning(from_pack(cond))


def calc_cond_batch(model: Any, conds: Sequence[Any], x_in: Tensor, timestep: Tensor,
                    model_options: Any = None) -> list[Tensor]:
    """Each prompt's x0 prediction, batched (None for a prompt gives zeros)."""
    guided = guided_model(model, "calc_cond_batch")
    return guided.calc_cond_batch([entries(guided, cond) for cond in conds], x_in, timestep)


def sampling_function(model: Any, x: Tensor, timestep: Tensor, uncond: Any, cond: Any,
                      cond_scale: float, model_options: Any = None, seed: Any = None) -> Tensor:
    """Classifier-free guidance of `cond` against `uncond` with the MODEL's CFG functions;
    `uncond` is skipped at scale 1 as in ComfyUI."""
    guided = guided_model(model, "sampling_function")
    scaled = dataclasses.replace(guided, positive=entries(guided, cond) or (),
                                 negative=entries(guided, uncond), cfg=float(cond_scale))
    return scaled(x, timestep)


def cfg_function(model: Any, cond_pred: Tensor, uncond_pred: Tensor, cond_scale: float,
                 x: Tensor, timestep: Tensor, model_options: Any = None, cond: Any = None,
                 uncond: Any = None) -> Tensor:
    """The CFG step on two predictions, with the MODEL's CFG and post-CFG functions."""
    guided = guided_model(model, "cfg_function")
    scaled = dataclasses.replace(guided, cfg=float(cond_scale))
    return scaled.combine(cond_pred, uncond_pred, x, timestep,
                          (entries(guided, cond), entries(guided, uncond)))
