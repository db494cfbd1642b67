"""The denoising loop, matching ComfyUI's numbers: samplers, schedules, noise, CONDITIONING
rules (conditioning.py), classifier-free guidance (guidance.py) and the KSampler glue
(ksampler.py). The top layer: may import every other subpackage of engine.diffusion.

How KSampler uses this package:

1. ``sampling = model_sampling(prediction, zsnr=...)`` for the checkpoint (or the
   ModelSamplingDiscrete patch); ``sigmas = sigmas_for(sampling, scheduler, steps, denoise,
   sampler_name=name)``; KSamplerAdvanced then takes ``step_range(sigmas, start_at_step,
   end_at_step, force_full_denoise=return_with_leftover_noise == "disable")``.
2. ``noise = initial_noise(latent, seed, batch_index)`` (zeros when noise is disabled);
   ``x = sampling.noise_scaling(sigmas[0], noise, latent,
   sampling.is_max_denoise(float(sigmas[0])))``.
3. ``model`` is ``Denoiser(unet, sampling)`` with classifier-free guidance on top; it must be
   called as ``model(x, sigma, **extra_args)`` and return x0.
4. ``x = get_sampler(name)(model, x, sigmas, extra_args=..., callback=...,
   noise=SeededNoise(seed), options=SamplerOptions())``, then
   ``sampling.inverse_noise_scaling(sigmas[-1], x)``. The CFG++ samplers (``*_cfg_pp``) also
   ask the model for its unconditional x0 (``GuidedDenoiser.with_uncond``).
"""

from engine.diffusion.networks.model_sampling import (
    PREDICTIONS,
    Denoiser,
    ModelSampling,
    model_sampling,
)
from engine.diffusion.sampling.noise import (
    NoiseSource,
    SeededNoise,
    ShapedNoise,
    StepNoise,
    initial_noise,
    random_inpaint_noise,
)
from engine.diffusion.sampling.samplers import (
    COMFYUI_SAMPLER_NAMES,
    SAMPLER_NAMES,
    SAMPLERS,
    SamplerSpec,
    get_sampler,
)
from engine.diffusion.sampling.samplers_common import (
    Callback,
    GuidedDenoiser,
    Model,
    SamplerOptions,
    denoise_with_uncond,
)
from engine.diffusion.sampling.schedulers import (
    SCHEDULER_NAMES,
    calculate_sigmas,
    exponential,
    karras,
    laplace,
    polyexponential,
    sd_turbo,
    sigmas_for,
    step_range,
    vp,
)

__all__ = [
    "COMFYUI_SAMPLER_NAMES",
    "PREDICTIONS",
    "SAMPLERS",
    "SAMPLER_NAMES",
    "SCHEDULER_NAMES",
    "Callback",
    "Denoiser",
    "GuidedDenoiser",
    "Model",
    "ModelSampling",
    "NoiseSource",
    "SamplerOptions",
    "SamplerSpec",
    "SeededNoise",
    "ShapedNoise",
    "StepNoise",
    "calculate_sigmas",
    "denoise_with_uncond",
    "exponential",
    "get_sampler",
    "initial_noise",
    "karras",
    "laplace",
    "model_sampling",
    "polyexponential",
    "random_inpaint_noise",
    "sd_turbo",
    "sigmas_for",
    "step_range",
    "vp",
]
