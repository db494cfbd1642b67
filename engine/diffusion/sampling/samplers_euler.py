"""Single-step samplers on the Karras ODE: Euler, Heun, DPM-2, their ancestral forms, DDPM, LCM
(and SamplerLCMUpscale's LCM that enlarges the latent as it goes)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy
import torch
from torch import Tensor

from engine.diffusion.sampling.noise import NoiseSource
from engine.diffusion.sampling.samplers_common import (
    Callback,
    Churn,
    Model,
    SamplerFunction,
    SamplerOptions,
    ancestral_step,
    notify,
    pick,
    to_d,
)


def euler(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """Euler steps, Algorithm 2 of Karras et al. (2022); also ComfyUI's "ddim"."""
    churn, draw = Churn.from_options(options), noise.gaussian(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = churn.apply(x, sigmas, i, draw)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        notify(callback, i, x, denoised, sigmas[i])
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


def euler_ancestral(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """Ancestral sampling with Euler steps (k-diffusion): step to sigma_down, add sigma_up noise."""
    eta, s_noise = pick(options.eta, 1.0), pick(options.s_noise, 1.0)
    draw = noise.gaussian(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        notify(callback, i, x, denoised, sigmas[i])
        if sigma_down == 0:
            x = denoised
        else:
            d = to_d(x, sigmas[i], denoised)
            dt = sigma_down - sigmas[i]
            x = x + d * dt + draw(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def heun(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """Heun's second-order method, Algorithm 2 of Karras et al. (2022); Euler into sigma 0."""
    churn, draw = Churn.from_options(options), noise.gaussian(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = churn.apply(x, sigmas, i, draw)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        notify(callback, i, x, denoised, sigmas[i])
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
        d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
        x = x + (d + d_2) / 2 * dt
    return x


def heunpp2(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """Heun++ (Carzit's sd-webui-samplers-scheduler): Heun with a third look-ahead evaluation.

    The derivatives at sigma_i, sigma_{i+1}, sigma_{i+2} are averaged with weights
    1 - w2 - w3, w2 = sigma_{i+1} / (3 sigma_0), w3 = sigma_{i+2} / (3 sigma_0); two from the
    end it is Heun with w2 = sigma_{i+1} / (2 sigma_0); the last step is Euler.
    """
    churn, draw = Churn.from_options(options), noise.gaussian(x)
    s_in = x.new_ones([x.shape[0]])
    s_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        x, sigma_hat = churn.apply(x, sigmas, i, draw)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        notify(callback, i, x, denoised, sigmas[i])
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == s_end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
        if sigmas[i + 2] == s_end:
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
            continue
        x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
        d_3 = to_d(x_3, sigmas[i + 2], model(x_3, sigmas[i + 2] * s_in, **extra_args))
        w2, w3 = sigmas[i + 1] / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0])
        x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


def dpm_2(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """DPM-Solver-2 midpoint steps in log-sigma (Lu et al. 2022) with Karras's Algorithm 2."""
    churn, draw = Churn.from_options(options), noise.gaussian(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = churn.apply(x, sigmas, i, draw)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        notify(callback, i, x, denoised, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
            continue
        sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
        x_2 = x + d * (sigma_mid - sigma_hat)
        d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
        x = x + d_2 * (sigmas[i + 1] - sigma_hat)
    return x


def dpm_2_ancestral(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """Ancestral sampling with DPM-Solver-2 steps to sigma_down, then sigma_up fresh noise."""
    eta, s_noise = pick(options.eta, 1.0), pick(options.s_noise, 1.0)
    draw = noise.gaussian(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        notify(callback, i, x, denoised, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
            continue
        sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
        x_2 = x + d * (sigma_mid - sigmas[i])
        d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
        x = x + d_2 * (sigma_down - sigmas[i])
        x = x + draw(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def ddpm(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """Ancestral DDPM steps (Ho et al. 2020, Algorithm 2) on the variance-preserving latent."""
    draw = noise.gaussian(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        notify(callback, i, x, denoised, sigma)
        eps = (x - denoised) / sigma
        alphas_cumprod = 1 / ((sigma * sigma) + 1)
        alphas_cumprod_prev = 1 / ((sigma_next * sigma_next) + 1)
        alpha = alphas_cumprod / alphas_cumprod_prev
        x_vp = x / torch.sqrt(1.0 + sigma**2.0)
        x = (1.0 / alpha).sqrt() * (x_vp - (1 - alpha) * eps / (1 - alphas_cumprod).sqrt())
        if sigma_next > 0:
            posterior_variance = (1 - alpha) * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
            x = x + posterior_variance.sqrt() * draw(sigma, sigma_next)
        if sigma_next != 0:
            x = x * torch.sqrt(1.0 + sigma_next**2.0)
    return x


def lcm(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """Latent Consistency Model multistep sampling (Luo et al. 2023): jump to x0, re-noise."""
    s_noise = pick(options.s_noise, 1.0)
    draw = noise.gaussian(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        notify(callback, i, x, denoised, sigmas[i])
        x = denoised
        if sigmas[i + 1] > 0:
            fresh = draw(sigmas[i], sigmas[i + 1])
            if s_noise != 1.0:
                fresh = fresh * s_noise
            x = fresh * sigmas[i + 1] + x  # ModelSampling.noise_scaling of the discrete models
    return x


Upscale = Callable[[Tensor, int, int], Tensor]
"""``upscale(latent, width, height)``: the latent resized to width x height cells."""


def lcm_upscale(upscale: Upscale, total_upscale: float,
                upscale_steps: int | None) -> SamplerFunction:
    """SamplerLCMUpscale's sampler: LCM steps that also enlarge the x0 estimate.

    Over the first ``upscale_steps`` steps (default: half of them plus one, at least 2) the
    size grows evenly from 1x to ``total_upscale``x the starting latent; each step's x0 is
    resized to its size before it is re-noised to the next sigma. The noise comes from the
    sampler's seeded per-step stream (ComfyUI draws it from torch's global generator).
    """

    def sample(model: Model, x: Tensor, sigmas: Tensor, *, extra_args: Mapping[str, object],
               callback: Callback | None, noise: NoiseSource, options: SamplerOptions) -> Tensor:
        steps = max(len(sigmas) // 2 + 1, 2) if upscale_steps is None \
            else min(upscale_steps + 1, len(sigmas) + 1)
        scales = numpy.linspace(1.0, total_upscale, steps)[1:]
        height, width = x.shape[-2:]
        draw = noise.gaussian_shaped(x)
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * s_in, **extra_args)
            notify(callback, i, x, denoised, sigmas[i])
            x = denoised
            if i < len(scales):
                x = upscale(x, round(width * float(scales[i])), round(height * float(scales[i])))
            if sigmas[i + 1] > 0:
                x = x + sigmas[i + 1] * draw(x.shape)
        return x

    if not math.isfinite(total_upscale) or total_upscale <= 0:
        raise ValueError(f"total_upscale must be a positive number, got {total_upscale}")
    return sample
