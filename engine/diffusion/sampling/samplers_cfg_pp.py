"""CFG++ samplers (Chung et al. 2024, arXiv 2406.08070): guidance without off-manifold steps.

Each step moves to the guided x0 but re-noises along the *unconditional* noise estimate
``(x - uncond) / sigma`` instead of the guided one, which lets low guidance scales (about 0.5
to 2) give what cfg 7 gives ordinary samplers. The model must hand back both predictions
(``samplers_common.denoise_with_uncond``); its uncond is evaluated even at cfg 1.

For the discrete SD models alpha = sigma * exp(lambda) with lambda = -log(sigma), which is 1 up
to rounding; it is kept in the formulas, computed as ComfyUI computes it.
"""

from __future__ import annotations

from collections.abc import Mapping

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


def euler_cfg_pp(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """Euler CFG++: x_next = D_guided + sigma_next * (x - D_uncond) / sigma; no noise."""
    deterministic = SamplerOptions(eta=0.0, s_noise=0.0)
    return euler_ancestral_cfg_pp(model, x, sigmas, extra_args=extra_args, callback=callback,
                                  noise=noise, options=deterministic)


def euler_ancestral_cfg_pp(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """Euler-ancestral CFG++: a DDIM step to sigma_down along the uncond estimate, then noise."""
    eta, s_noise = pick(options.eta, 1.0), pick(options.s_noise, 1.0)
    draw = noise.gaussian(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, uncond = denoise_with_uncond(model, x, sigma * s_in, extra_args)
        notify(callback, i, x, denoised, sigma)
        if sigma_next == 0:
            x = denoised
            continue
        alpha_s = sigma * half_log_snr(sigma).exp()
        alpha_t = sigma_next * half_log_snr(sigma_next).exp()
        d = to_d(x, sigma, alpha_s * uncond)
        sigma_down, sigma_up = ancestral_step(sigma / alpha_s, sigma_next / alpha_t, eta)
        x = alpha_t * denoised + alpha_t * sigma_down * d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * draw(sigma, sigma_next) * s_noise * sigma_up
    return x


def dpmpp_2s_ancestral_cfg_pp(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """DPM-Solver++(2S) ancestral CFG++, as ComfyUI 0.8 computes it.

    Both stages start from x + (D - D_uncond) and move towards the guided x0 estimates; the
    full step takes the guidance difference with the uncond of the midpoint evaluation (not
    the first one: ComfyUI 0.8's captured uncond is overwritten by the second model call).
    The last step is the plain Euler move to D.
    """
    eta, s_noise = pick(options.eta, 1.0), pick(options.s_noise, 1.0)
    draw = noise.gaussian(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, uncond = denoise_with_uncond(model, x, sigma * s_in, extra_args)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        notify(callback, i, x, denoised, sigma)
        if sigma_down == 0:
            x = denoised + to_d(x, sigma, uncond) * sigma_down
        else:
            t, t_next = half_log_snr(sigma), half_log_snr(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (sigma_at(s) / sigma_at(t)) * (x + (denoised - uncond)) \
                - (-h * 0.5).expm1() * denoised
            denoised_2, uncond = denoise_with_uncond(model, x_2, sigma_at(s) * s_in, extra_args)
            x = (sigma_at(t_next) / sigma_at(t)) * (x + (denoised - uncond)) \
                - (-h).expm1() * denoised_2
        if sigma_next > 0:
            x = x + draw(sigma, sigma_next) * s_noise * sigma_up
    return x


def dpmpp_2m_cfg_pp(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """DPM-Solver++(2M) CFG++: the multistep correction built from the uncond history.

    x_next = D + e^-h (x - D_u) - (e^-h - 1) / (2 r) (D - D_u,prev), r = h_prev / h; the
    first and last steps drop the correction.
    """
    s_in = x.new_ones([x.shape[0]])
    old_uncond = None
    for i in range(len(sigmas) - 1):
        denoised, uncond = denoise_with_uncond(model, x, sigmas[i] * s_in, extra_args)
        notify(callback, i, x, denoised, sigmas[i])
        t, t_next = half_log_snr(sigmas[i]), half_log_snr(sigmas[i + 1])
        h = t_next - t
        decay = (-h).exp()
        mix = -decay * uncond
        if old_uncond is not None and sigmas[i + 1] != 0:
            r = (t - half_log_snr(sigmas[i - 1])) / h
            mix = mix - (-h).expm1() * (1 / (2 * r)) * (denoised - old_uncond)
        x = denoised + mix + decay * x
        old_uncond = uncond
    return x


def euler_cfg_pp_alternative(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """SamplerEulerCFG++'s "alternative" version: Euler steps along (x - 2 D + D_uncond) / sigma."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised, uncond = denoise_with_uncond(model, x, sigmas[i] * s_in, extra_args)
        d = to_d(x - denoised + uncond, sigmas[i], denoised)
        notify(callback, i, x, denoised, sigmas[i])
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x
