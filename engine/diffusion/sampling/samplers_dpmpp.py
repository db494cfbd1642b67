"""DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095): data-prediction solvers in lambda = -log sigma.

The SDE forms (Gonzalez et al. 2023 for 2M/3M SDE) draw their noise from a Brownian tree so
that the result barely depends on the step count; the plain names build the tree on the CPU,
the ``_gpu`` names on the latent's device.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from engine.diffusion.sampling.noise import NoiseSource, StepNoise
from engine.diffusion.sampling.samplers_common import (
    DPMPP_SOLVER_TYPES,
    Callback,
    Model,
    SamplerOptions,
    ancestral_step,
    half_log_snr,
    notify,
    pick,
    sigma_at,
    solver_type,
    to_d,
)


def _brownian(x: Tensor, sigmas: Tensor, noise: NoiseSource, tree_on_cpu: bool) -> StepNoise:
    """The Brownian tree over [smallest non-zero sigma, largest sigma] of this schedule."""
    sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
    return noise.brownian(x, sigma_min, sigma_max, tree_on_cpu=tree_on_cpu)


def dpmpp_2s_ancestral(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """Ancestral sampling with DPM-Solver++(2S) single-step second-order steps to sigma_down."""
    eta, s_noise = pick(options.eta, 1.0), pick(options.s_noise, 1.0)
    draw = noise.gaussian(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        notify(callback, i, x, denoised, sigmas[i])
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = half_log_snr(sigmas[i]), half_log_snr(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (sigma_at(s) / sigma_at(t)) * x - (-h * 0.5).expm1() * denoised
            denoised_2 = model(x_2, sigma_at(s) * s_in, **extra_args)
            x = (sigma_at(t_next) / sigma_at(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + draw(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def dpmpp_sde(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """DPM-Solver++ (stochastic), a two-stage SDE solver with its midpoint at ratio r."""
    return _dpmpp_sde(model, x, sigmas, extra_args, callback, noise, options, tree_on_cpu=True)


def dpmpp_sde_gpu(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """DPM-Solver++ (stochastic) with the Brownian tree on the latent's device."""
    return _dpmpp_sde(model, x, sigmas, extra_args, callback, noise, options, tree_on_cpu=False)


def _dpmpp_sde(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
    tree_on_cpu: bool,
) -> Tensor:
    if len(sigmas) <= 1:
        return x
    eta, s_noise, r = pick(options.eta, 1.0), pick(options.s_noise, 1.0), pick(options.r, 0.5)
    draw = _brownian(x, sigmas, noise, tree_on_cpu)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        notify(callback, i, x, denoised, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = half_log_snr(sigmas[i]), half_log_snr(sigmas[i + 1])
        h = lambda_t - lambda_s
        lambda_s_1 = lambda_s + r * h
        fac = 1 / (2 * r)
        sigma_s_1 = sigma_at(lambda_s_1)
        alpha_s = sigmas[i] * lambda_s.exp()
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()
        # Step 1: to lambda_s_1, partly deterministic (to sigma_down), partly noise (sigma_up).
        sigma_down, sigma_up = ancestral_step(sigma_at(lambda_s), sigma_at(lambda_s_1), eta)
        h_ = half_log_snr(sigma_down) - lambda_s
        x_2 = (alpha_s_1 / alpha_s) * (-h_).exp() * x - alpha_s_1 * (-h_).expm1() * denoised
        if eta > 0 and s_noise > 0:
            x_2 = x_2 + alpha_s_1 * draw(sigmas[i], sigma_s_1) * s_noise * sigma_up
        denoised_2 = model(x_2, sigma_s_1 * s_in, **extra_args)
        # Step 2: the full step with the denoised estimates of both stages combined.
        sigma_down, sigma_up = ancestral_step(sigma_at(lambda_s), sigma_at(lambda_t), eta)
        h_ = half_log_snr(sigma_down) - lambda_s
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * draw(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def dpmpp_2m(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """DPM-Solver++(2M): second-order multistep, Algorithm 2 of Lu et al. (2022b)."""
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        notify(callback, i, x, denoised, sigmas[i])
        t, t_next = half_log_snr(sigmas[i]), half_log_snr(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            denoised_d = denoised
        else:
            r = (t - half_log_snr(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_at(t_next) / sigma_at(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def dpmpp_2m_sde(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """DPM-Solver++(2M) SDE with a midpoint (default) or Heun second-order correction."""
    return _dpmpp_multistep_sde(model, x, sigmas, extra_args, callback, noise, options, 2, True)


def dpmpp_2m_sde_gpu(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """DPM-Solver++(2M) SDE with the Brownian tree on the latent's device."""
    return _dpmpp_multistep_sde(model, x, sigmas, extra_args, callback, noise, options, 2, False)


def dpmpp_2m_sde_heun(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """DPM-Solver++(2M) SDE with the Heun correction by default."""
    return _dpmpp_multistep_sde(model, x, sigmas, extra_args, callback, noise, options, 2, True,
                                default_solver="heun")


def dpmpp_2m_sde_heun_gpu(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """DPM-Solver++(2M) SDE, Heun correction, Brownian tree on the latent's device."""
    return _dpmpp_multistep_sde(model, x, sigmas, extra_args, callback, noise, options, 2, False,
                                default_solver="heun")


def dpmpp_3m_sde(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """DPM-Solver++(3M) SDE: third-order multistep with Brownian-tree noise."""
    return _dpmpp_multistep_sde(model, x, sigmas, extra_args, callback, noise, options, 3, True)


def dpmpp_3m_sde_gpu(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """DPM-Solver++(3M) SDE with the Brownian tree on the latent's device."""
    return _dpmpp_multistep_sde(model, x, sigmas, extra_args, callback, noise, options, 3, False)


def _dpmpp_multistep_sde(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
    order: int,
    tree_on_cpu: bool,
    default_solver: str = "midpoint",
) -> Tensor:
    if len(sigmas) <= 1:
        return x
    eta, s_noise = pick(options.eta, 1.0), pick(options.s_noise, 1.0)
    solver = default_solver
    if order == 2:
        solver = solver_type(options, "dpmpp_2m_sde", DPMPP_SOLVER_TYPES, default_solver)
    draw = _brownian(x, sigmas, noise, tree_on_cpu)
    s_in = x.new_ones([x.shape[0]])
    denoised_1 = denoised_2 = h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        notify(callback, i, x, denoised, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = half_log_snr(sigmas[i]), half_log_snr(sigmas[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (
                -h_eta
            ).expm1().neg() * denoised
            if order == 3 and h_2 is not None:
                d1, d2 = _third_order_differences(h, h_1, h_2, denoised, denoised_1, denoised_2)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif order == 3 and h_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                x = x + (alpha_t * (h_eta.neg().expm1() / h_eta + 1)) * d
            elif order == 2 and denoised_1 is not None:
                difference, r = denoised - denoised_1, h_1 / h
                x = x + _second_order_correction(solver, r, h_eta, alpha_t, difference)
            if eta > 0 and s_noise > 0:
                step_noise = draw(sigmas[i], sigmas[i + 1])
                x = x + step_noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def _second_order_correction(
    solver: str, r: Tensor, h_eta: Tensor, alpha_t: Tensor, difference: Tensor
) -> Tensor:
    """The 2M SDE correction term for denoised - old_denoised (r = h_last / h)."""
    if solver == "heun":
        return alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * difference
    return 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * difference


def _third_order_differences(
    h: Tensor,
    h_1: Tensor,
    h_2: Tensor,
    denoised: Tensor,
    denoised_1: Tensor,
    denoised_2: Tensor,
) -> tuple[Tensor, Tensor]:
    """First and second divided differences of the last three denoised estimates in lambda."""
    r0, r1 = h_1 / h, h_2 / h
    d1_0 = (denoised - denoised_1) / r0
    d1_1 = (denoised_1 - denoised_2) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return d1, d2
