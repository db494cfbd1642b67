"""Multistep samplers on the x0 history: RES (Zhang et al. 2023, arXiv 2308.02157) and the
gradient-estimation sampler (Permenter & Yuan 2024, "Interpreting and improving diffusion
models from an optimization perspective"), each with its ancestral and CFG++ forms."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from engine.diffusion.sampling.noise import NoiseSource
from engine.diffusion.sampling.samplers_common import (
    Callback,
    Model,
    SamplerOptions,
    ancestral_step,
    denoise_with_uncond,
    half_log_snr,
    notify,
    pick,
    sigma_at,
    to_d,
)


def _phi_1(t: Tensor) -> Tensor:
    """phi_1(t) = (e^t - 1) / t of exponential integrators."""
    return torch.expm1(t) / t


def _phi_2(t: Tensor) -> Tensor:
    """phi_2(t) = (phi_1(t) - 1) / t."""
    return (_phi_1(t) - 1.0) / t


def _res_multistep(model: Model, x: Tensor, sigmas: Tensor, extra_args: Mapping[str, object],
                   callback: Callback | None, noise: NoiseSource, eta: float, s_noise: float,
                   cfg_pp: bool) -> Tensor:
    """RES second-order multistep in lambda = -log(sigma), stepping to sigma_down (eta > 0
    adds sigma_up fresh noise); the first step and the step to sigma 0 are Euler."""
    draw = noise.gaussian(x)
    s_in = x.new_ones([x.shape[0]])
    old_denoised: Tensor | None = None
    old_sigma_down = sigmas[0]
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, uncond = (denoise_with_uncond(model, x, sigma * s_in, extra_args) if cfg_pp
                            else (model(x, sigma * s_in, **extra_args), None))
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        notify(callback, i, x, denoised, sigma)
        if sigma_down == 0 or old_denoised is None:
            if uncond is not None:
                x = denoised + to_d(x, sigma, uncond) * sigma_down
            else:
                x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            t, t_next = half_log_snr(sigma), half_log_snr(sigma_down)
            h = t_next - t
            c2 = (half_log_snr(sigmas[i - 1]) - half_log_snr(old_sigma_down)) / h
            b1 = torch.nan_to_num(_phi_1(-h) - _phi_2(-h) / c2, nan=0.0)
            b2 = torch.nan_to_num(_phi_2(-h) / c2, nan=0.0)
            current = denoised
            if uncond is not None:
                x, current = x + (denoised - uncond), uncond
            x = sigma_at(h) * x + h * (b1 * current + b2 * old_denoised)
        if sigma_next > 0:
            x = x + draw(sigma, sigma_next) * s_noise * sigma_up
        old_denoised = denoised if uncond is None else uncond
        old_sigma_down = sigma_down
    return x


def res_multistep(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """RES multistep (second order, deterministic)."""
    return _res_multistep(model, x, sigmas, extra_args, callback, noise, 0.0,
                          pick(options.s_noise, 1.0), cfg_pp=False)


def res_multistep_cfg_pp(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """RES multistep CFG++: steps along the uncond estimate plus the guidance difference."""
    return _res_multistep(model, x, sigmas, extra_args, callback, noise, 0.0,
                          pick(options.s_noise, 1.0), cfg_pp=True)


def res_multistep_ancestral(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """RES multistep ancestral: to sigma_down, then sigma_up of fresh noise (eta 1)."""
    return _res_multistep(model, x, sigmas, extra_args, callback, noise,
                          pick(options.eta, 1.0), pick(options.s_noise, 1.0), cfg_pp=False)


def res_multistep_ancestral_cfg_pp(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """RES multistep ancestral CFG++."""
    return _res_multistep(model, x, sigmas, extra_args, callback, noise,
                          pick(options.eta, 1.0), pick(options.s_noise, 1.0), cfg_pp=True)


def _gradient_estimation(model: Model, x: Tensor, sigmas: Tensor,
                         extra_args: Mapping[str, object], callback: Callback | None,
                         ge_gamma: float, cfg_pp: bool) -> Tensor:
    """Euler steps whose direction is extrapolated: d + (gamma - 1) (d - d_prev)."""
    s_in = x.new_ones([x.shape[0]])
    old_d = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if cfg_pp:
            denoised, uncond = denoise_with_uncond(model, x, sigma * s_in, extra_args)
            d = to_d(x, sigma, uncond)
        else:
            denoised = model(x, sigma * s_in, **extra_args)
            d = to_d(x, sigma, denoised)
        notify(callback, i, x, denoised, sigma)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = denoised
        else:
            x = denoised + d * sigma_next if cfg_pp else x + d * dt
            if old_d is not None:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


def gradient_estimation(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """Gradient estimation (Permenter & Yuan 2024): Euler with a momentum-like correction."""
    return _gradient_estimation(model, x, sigmas, extra_args, callback,
                                pick(options.ge_gamma, 2.0), cfg_pp=False)


def gradient_estimation_cfg_pp(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """Gradient estimation on the uncond estimate (CFG++)."""
    return _gradient_estimation(model, x, sigmas, extra_args, callback,
                                pick(options.ge_gamma, 2.0), cfg_pp=True)
