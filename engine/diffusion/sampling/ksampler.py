"""KSampler and custom sampling: the glue between a MODEL, its prompts and the samplers.

One path serves KSampler, KSamplerAdvanced, SamplerCustom and SamplerCustomAdvanced, so the
same settings give the same latent through any of them (as in ComfyUI):

1. The LATENT holds raw VAE latents; non-zero ones are multiplied by the model's latent scale
   on the way in, and the result is divided by it on the way out.
2. The noise mask (any size) is resized bilinearly to the latent and repeated over channels
   and batch. Inside the mask the sampler works freely; outside, before every model call the
   latent is replaced by ``latent + sigma * noise`` and the model's x0 by the latent (ddim uses
   its own noise for that: ``noise.random_inpaint_noise``). The kept area therefore comes back
   equal to the input up to float rounding, not bit for bit - ComfyUI does the same.
3. ``x = noise_scaling(sigmas[0], noise, latent, max_denoise)``, the sampler runs with the
   network patched (LoRA...) for its whole duration, then ``inverse_noise_scaling`` (a sampler
   with ``whole_run``, a pack's own comfy.samplers.Sampler, does 2 and 3 itself).
4. After every step ``progress(step + 1, len(sigmas) - 1, denoised)`` is called; it may raise
   to interrupt.
5. Sampler settings that depend on the model (sa_solver's SDE interval, 20% to 80% of its
   schedule) are filled in from the MODEL when left unset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from engine.diffusion.patches.model_handle import LatentFormat, ModelHandle
from engine.diffusion.patches.model_patches import DenoiseMaskFunction
from engine.diffusion.patches.patching import patched
from engine.diffusion.sampling import (
    ModelSampling,
    SamplerOptions,
    SamplerSpec,
    SeededNoise,
    calculate_sigmas,
    denoise_with_uncond,
    get_sampler,
    initial_noise,
    random_inpaint_noise,
    sigmas_for,
    step_range,
)
from engine.diffusion.sampling.conditioning import Conditioning, SamplingInputs
from engine.diffusion.sampling.guidance import Guider
from engine.diffusion.sampling.sa_solver import sde_interval
from engine.image_ops import repeat_to_batch
from engine.values import Latent

StepProgress = Callable[[int, int, Tensor], None]
"""``progress(steps_done, total_steps, denoised)``; denoised is the model-space x0 batch."""

PREVIEW_MAX_SIDE = 512  # previews are upscaled from latent size towards image size, capped here
PREVIEW_EVERY_STEP_CELLS = 128 * 128  # larger latents get a preview every PREVIEW_STRIDE steps
PREVIEW_STRIDE = 3


WholeRun = Callable[..., Tensor]
"""``run(denoiser, sigmas, noise, latent_image, denoise_mask, callback, seed) -> x``: a sampler
that does its own noise scaling and inpainting (a pack's comfy.samplers.Sampler): it gets the
guided denoiser, the raw noise and the model-space latent, and returns the model-space result."""


@dataclass(frozen=True)
class SamplerChoice:
    """SAMPLER: a registered sampler (ComfyUI's sampler_name) and its settings, or one a node
    builds itself (``built``: SamplerLCMUpscale, SamplerEulerCFG++'s alternative), or one that
    runs the whole sampling itself (``whole_run``)."""

    name: str
    options: SamplerOptions = field(default_factory=SamplerOptions)
    built: SamplerSpec | None = None
    whole_run: WholeRun | None = None

    @property
    def spec(self) -> SamplerSpec:
        return self.built if self.built is not None else get_sampler(self.name)

    def options_for(self, sampling: ModelSampling) -> SamplerOptions:
        """The options with the model-dependent defaults filled in (module docstring, 5)."""
        options = self.options
        if options.sde_start_sigma is not None and options.sde_end_sigma is not None:
            return options
        start, end = sde_interval(sampling)
        return dataclasses.replace(
            options,
            sde_start_sigma=start if options.sde_start_sigma is None else options.sde_start_sigma,
            sde_end_sigma=end if options.sde_end_sigma is None else options.sde_end_sigma)


class PreparedGuidance(Protocol):
    """A guider resolved against one latent: what the sampler calls as its model."""

    def __call__(self, x: Tensor, sigma: Tensor, **extra: object) -> Tensor: ...

    def with_uncond(self, x: Tensor, sigma: Tensor, **extra: object) -> tuple[Tensor, Tensor]:
        ...

    def cleanup(self) -> None: ...


@runtime_checkable
class SamplingGuider(Protocol):
    """GUIDER: a model plus how its predictions are combined (CFGGuider, DualCFGGuider ...)."""

    @property
    def model(self) -> ModelHandle: ...

    def prepare(self, inputs: SamplingInputs) -> PreparedGuidance: ...


class NoiseGenerator(Protocol):
    """NOISE: where a custom sampling run's initial noise comes from."""

    @property
    def seed(self) -> int: ...

    def generate_noise(self, latent: Latent) -> Tensor: ...


@dataclass(frozen=True)
class RandomNoise:
    """NOISE: ComfyUI's seeded initial noise (batch_index honoured)."""

    seed: int

    def generate_noise(self, latent: Latent) -> Tensor:
        latent = Latent.of(latent)
        return initial_noise(latent.samples, self.seed, latent.batch_index)


@dataclass(frozen=True)
class DisabledNoise:
    """NOISE: none (zeros), for latents that already carry their noise; seed 0 as ComfyUI."""

    seed: int = 0

    def generate_noise(self, latent: Latent) -> Tensor:
        samples = Latent.of(latent).samples
        return torch.zeros(samples.shape, dtype=samples.dtype, layout=samples.layout,
                           device="cpu")


@dataclass(frozen=True, eq=False)
class SampleResult:
    """Raw-space results: the sampled latent and the last step's x0 (None if no step ran)."""

    samples: Tensor
    denoised: Tensor | None


def sample(model: ModelHandle, positive: Conditioning, negative: Conditioning, latent: Latent,
           *, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
           denoise: float = 1.0, add_noise: bool = True, start_step: int | None = None,
           end_step: int | None = None, force_full_denoise: bool = False,
           progress: StepProgress | None = None) -> Latent:
    """KSampler / KSamplerAdvanced: sample `latent` and return it with new samples."""
    latent = Latent.of(latent)
    image = fit_latent_channels(model, latent.samples)
    latent = latent.replace(samples=image)
    noise = (RandomNoise(seed) if add_noise else DisabledNoise()).generate_noise(latent)
    sigmas = sigmas_for(model.sampling, scheduler, steps, denoise, sampler_name=sampler_name)
    sigmas = step_range(sigmas, start_step, end_step, force_full_denoise)
    if sigmas is None:
        return latent
    result = guided_sample(Guider(model, positive, negative, cfg), SamplerChoice(sampler_name),
                           sigmas, noise, latent, seed=seed, progress=progress)
    return latent.replace(samples=result.samples)


def sample_custom(guider: SamplingGuider, sampler: SamplerChoice, sigmas: Tensor,
                  noise: NoiseGenerator, latent: Latent, *, seed: int | None = None,
                  progress: StepProgress | None = None) -> tuple[Latent, Latent]:
    """SamplerCustom(Advanced): (sampled latent, last x0 as a latent - the output if none).

    `seed` seeds the samplers' own per-step noise; it defaults to the noise's seed.
    """
    if not isinstance(sampler, SamplerChoice):
        raise TypeError(f"the sampler input must be a SAMPLER from KSamplerSelect, got "
                        f"{type(sampler).__name__}")
    latent = Latent.of(latent)
    latent = latent.replace(samples=fit_latent_channels(guider.model, latent.samples))
    result = guided_sample(guider, sampler, sigmas, noise.generate_noise(latent), latent,
                           seed=noise.seed if seed is None else seed, progress=progress)
    out = latent.replace(samples=result.samples)
    if result.denoised is None:
        return out, out
    return out, latent.replace(samples=result.denoised)


def guided_sample(guider: SamplingGuider, sampler: SamplerChoice, sigmas: Tensor, noise: Tensor,
                  latent: Latent, *, seed: int, progress: StepProgress | None = None
                  ) -> SampleResult:
    """Run one sampler over `sigmas` from `latent` + `noise` (the module docstring's recipe)."""
    latent_image = latent.samples
    if sigmas.numel() == 0:
        return SampleResult(latent_image, None)
    model = guider.model
    device = model.device
    scale = model.latent_format.scale
    image = latent_image.to(device)
    if torch.count_nonzero(image) > 0:  # an empty latent stays exactly zero
        image = image * scale
    noise, sigmas = noise.to(device), sigmas.to(device)
    mask = None
    if latent.noise_mask is not None:
        mask = prepare_noise_mask(latent.noise_mask, noise.shape, device)
    guided = guider.prepare(SamplingInputs(noise.shape, image, mask, device, sigmas, seed))
    last: list[Tensor] = []
    callback = _step_callback(len(sigmas) - 1, progress, last)
    try:
        with patched(model.unet, model.patches):
            if sampler.whole_run is not None:
                x = sampler.whole_run(guided, sigmas, noise, image, mask, callback, seed)
            else:
                x = _run_sampler(sampler, guided, model, sigmas, noise, image, mask, seed,
                                 callback)
    finally:
        guided.cleanup()
    samples = (x.to(torch.float32) / scale).cpu()
    denoised = (last[0].to(torch.float32) / scale).cpu() if last else None
    return SampleResult(samples, denoised)


def _run_sampler(sampler: SamplerChoice, guided: PreparedGuidance, model: ModelHandle,
                 sigmas: Tensor, noise: Tensor, image: Tensor, mask: Tensor | None, seed: int,
                 callback: Callable[[int, Tensor, Tensor, Tensor], None]) -> Tensor:
    """Noise scaling, the sampler over the (inpainting-wrapped) denoiser, inverse scaling."""
    spec, sampling = sampler.spec, model.sampling
    denoiser: Callable[..., Tensor] = guided
    if mask is not None:
        kept = random_inpaint_noise(noise, seed) if spec.random_inpaint_noise else noise
        denoiser = InpaintModel(guided, sampling, image, kept, mask, sigmas,
                                model.model_patches.denoise_mask_function)
    x = sampling.noise_scaling(sigmas[0], noise, image,
                               sampling.is_max_denoise(float(sigmas[0])))
    x = spec(denoiser, x, sigmas, extra_args={}, callback=callback, noise=SeededNoise(seed),
             options=sampler.options_for(sampling))
    return sampling.inverse_noise_scaling(sigmas[-1], x)


def _step_callback(total: int, progress: StepProgress | None, last: list[Tensor]
                   ) -> Callable[[int, Tensor, Tensor, Tensor], None]:
    def callback(step: int, x: Tensor, denoised: Tensor, sigma: Tensor) -> None:
        last[:] = [denoised]
        if progress is not None:
            progress(step + 1, total, denoised)

    return callback


@dataclass(frozen=True, eq=False)
class InpaintModel:
    """Keeps the unmasked area on the input latent's noisy path (ComfyUI's inpaint wrapper).

    A MODEL's denoise mask function may change the mask at every call: ``mask_function(sigma,
    denoise_mask, extra_options={"model": inner, "sigmas": the run's schedule})``."""

    inner: Callable[..., Tensor]
    sampling: ModelSampling
    latent_image: Tensor
    noise: Tensor
    denoise_mask: Tensor
    sigmas: Tensor | None = None
    mask_function: DenoiseMaskFunction | None = None

    def __call__(self, x: Tensor, sigma: Tensor, **extra: object) -> Tensor:
        mask = self._mask(sigma)
        return self._kept(self.inner(self._noised(x, sigma, mask), sigma, **extra), mask)

    def with_uncond(self, x: Tensor, sigma: Tensor, **extra: object) -> tuple[Tensor, Tensor]:
        """The masked x0 and the guider's raw uncond x0 (ComfyUI's CFG++ sees it unmasked)."""
        mask = self._mask(sigma)
        out, uncond = denoise_with_uncond(self.inner, self._noised(x, sigma, mask), sigma, extra)
        return self._kept(out, mask), uncond

    def _mask(self, sigma: Tensor) -> Tensor:
        if self.mask_function is None:
            return self.denoise_mask
        return self.mask_function(sigma, self.denoise_mask,
                                  extra_options={"model": self.inner, "sigmas": self.sigmas})

    def _noised(self, x: Tensor, sigma: Tensor, mask: Tensor) -> Tensor:
        sigma_view = sigma.reshape([sigma.shape[0]] + [1] * (self.noise.ndim - 1))
        noisy_kept = self.sampling.noise_scaling(sigma_view, self.noise, self.latent_image)
        return x * mask + noisy_kept * (1.0 - mask)

    def _kept(self, out: Tensor, mask: Tensor) -> Tensor:
        return out * mask + self.latent_image * (1.0 - mask)


def prepare_noise_mask(mask: Tensor, shape: torch.Size, device: torch.device) -> Tensor:
    """A noise mask of any size as (B, C, H, W) at the latent size (bilinear, as ComfyUI)."""
    mask = mask.to(torch.float32).reshape((-1, 1, mask.shape[-2], mask.shape[-1]))
    mask = torch.nn.functional.interpolate(mask, size=tuple(shape[2:]), mode="bilinear")
    mask = mask.repeat(1, shape[1], 1, 1)
    return repeat_to_batch(mask, shape[0]).to(device)


def fit_latent_channels(model: ModelHandle, samples: Tensor) -> Tensor:
    """An all-zero latent with the wrong channel count gets the model's; others must match."""
    channels = model.latent_format.channels
    if samples.ndim != 4:
        raise ValueError(f"the latent has shape {tuple(samples.shape)}; expected (batch, "
                         f"{channels}, height/8, width/8) from EmptyLatentImage or VAEEncode")
    if samples.shape[1] == channels:
        return samples
    if torch.count_nonzero(samples) == 0:
        return samples.new_zeros((samples.shape[0], channels, *samples.shape[2:]))
    raise ValueError(f"the latent has {samples.shape[1]} channels but this {model.family} "
                     f"model works on {channels}; encode the image with this model's VAE")


def preview_image(latent_format: LatentFormat, denoised: Tensor) -> Image.Image:
    """The first sample's x0 as a small RGB image (latent -> RGB factors), upscaled <= 512 px."""
    rgb = latent_format.preview_rgb(denoised[0].detach())  # (h, w, 3) in 0..1
    pixels = (rgb * 255).to(torch.uint8).numpy()  # truncated, as ComfyUI's previews
    image = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    factor = min(8.0, PREVIEW_MAX_SIDE / max(image.size))
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return image.resize(size, Image.Resampling.BILINEAR) if size != image.size else image


def wants_preview(step: int, total: int, denoised: Tensor) -> bool:
    """Every step for ordinary latents; every 3rd (and the last) for very large ones."""
    cells = denoised.shape[-1] * denoised.shape[-2]
    return cells <= PREVIEW_EVERY_STEP_CELLS or step % PREVIEW_STRIDE == 0 or step == total


def default_sigmas(model: ModelHandle, scheduler: str, steps: int, denoise: float) -> Tensor:
    """BasicScheduler: like KSampler's schedule without the per-sampler extra step."""
    if denoise <= 0.0:
        return torch.FloatTensor([])
    total = steps if denoise >= 1.0 else int(steps / denoise)
    return calculate_sigmas(model.sampling, scheduler, total)[-(steps + 1):].cpu()
