"""Stochastic exponential-integrator samplers in data prediction and lambda = -log(sigma):
SEEDS-2/3 (Gonzalez et al. 2023, arXiv 2305.14267), the exponential Heun method, and the
ER-SDE solver (Cui et al. 2023, arXiv 2309.06169).

SEEDS with eta > 0 integrates the SDE whose noise over a step of size h has variance
sigma_t^2 (1 - e^(-2 eta h)); its noise at an intermediate stage is carried on to the next
stage with the factor e^((r_a - r_b) eta h) and topped up, as the paper's correlated draws.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from engine.diffusion.sampling.noise import NoiseSource, StepNoise
from engine.diffusion.sampling.samplers_common import (
    ER_SDE_SOLVER_TYPES,
    SEEDS_SOLVER_TYPES,
    Callback,
    Model,
    SamplerOptions,
    half_log_snr,
    notify,
    pick,
    sigma_at,
    solver_type,
)

ER_SDE_INTEGRATION_POINTS = 200  # the rectangle rule's points for ER-SDE's stage integrals


def _h_phi_1(h: Tensor) -> Tensor:
    """h * phi_1(h) = e^h - 1."""
    return torch.expm1(h)


def _h_phi_2(h: Tensor) -> Tensor:
    """h * phi_2(h) = (e^h - 1 - h) / h."""
    return (torch.expm1(h) - h) / h


class _SdeNoise:
    """SEEDS's noise across the stages of one step, in units of the current stage's sigma."""

    def __init__(self, draw: StepNoise, eta: float, h: Tensor) -> None:
        self.draw, self.eta, self.h = draw, eta, h
        self.value: Tensor | None = None

    def advance(self, r_from: float, r_to: float, sigma_from: Tensor, sigma_to: Tensor) -> Tensor:
        """The noise at stage r_to: the previous stage's decayed by e^(-(r_to - r_from) eta h)
        plus a fresh draw of the missing variance."""
        segment = (r_from - r_to) * self.h * self.eta
        fresh = segment.mul(2).expm1().neg().sqrt() * self.draw(sigma_from, sigma_to)
        self.value = fresh if self.value is None else self.value * segment.exp() + fresh
        return self.value


def _seeds(model: Model, x: Tensor, sigmas: Tensor, extra_args: Mapping[str, object],
           callback: Callback | None, noise: NoiseSource, eta: float, s_noise: float,
           stages: Callable[..., Tensor]) -> Tensor:
    """The step loop shared by SEEDS-2/3; `stages` makes one step from sigma_i to sigma_i+1."""
    draw = noise.gaussian(x)
    s_in = x.new_ones([x.shape[0]])
    inject = eta > 0 and s_noise > 0
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        notify(callback, i, x, denoised, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        h = half_log_snr(sigmas[i + 1]) - half_log_snr(sigmas[i])
        sde_noise = _SdeNoise(draw, eta, h) if inject else None
        x = stages(x, sigmas[i], sigmas[i + 1], h, denoised, sde_noise, s_noise, s_in)
    return x


def _seeds_2_step(model: Model, extra_args: Mapping[str, object], eta: float, r: float,
                  solver: str) -> Callable[..., Tensor]:
    def step(x: Tensor, sigma: Tensor, sigma_next: Tensor, h: Tensor, denoised: Tensor,
             sde_noise: _SdeNoise | None, s_noise: float, s_in: Tensor) -> Tensor:
        h_eta = h * (eta + 1)
        lambda_1 = torch.lerp(half_log_snr(sigma), half_log_snr(sigma_next), r)
        sigma_1 = sigma_at(lambda_1)
        alpha_1, alpha_t = sigma_1 * lambda_1.exp(), sigma_next * half_log_snr(sigma_next).exp()
        x_2 = (sigma_1 / sigma * (-r * h * eta).exp() * x
               - alpha_1 * _h_phi_1(-r * h_eta) * denoised)
        if sde_noise is not None:
            x_2 = x_2 + sde_noise.advance(0.0, r, sigma, sigma_1) * sigma_1 * s_noise
        denoised_2 = model(x_2, sigma_1 * s_in, **extra_args)
        decayed = sigma_next / sigma * (-h * eta).exp() * x
        if solver == "phi_1":
            x = decayed - alpha_t * _h_phi_1(-h_eta) * torch.lerp(denoised, denoised_2, 1 / (2 * r))
        else:
            b2 = _h_phi_2(-h_eta) / r
            b1 = _h_phi_1(-h_eta) - b2
            x = decayed - alpha_t * (b1 * denoised + b2 * denoised_2)
        if sde_noise is not None:
            x = x + sde_noise.advance(r, 1.0, sigma_1, sigma_next) * sigma_next * s_noise
        return x

    return step


def _run_seeds_2(model: Model, x: Tensor, sigmas: Tensor, extra_args: Mapping[str, object],
                 callback: Callback | None, noise: NoiseSource, eta: float, s_noise: float,
                 r: float, solver: str) -> Tensor:
    step = _seeds_2_step(model, extra_args, eta, r, solver)
    return _seeds(model, x, sigmas, extra_args, callback, noise, eta, s_noise, step)


def seeds_2(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """SEEDS-2: two stages, the second at ratio r (0.5) of the step; "phi_1" averages the two
    x0 estimates, "phi_2" weights them with the phi_2 function."""
    solver = solver_type(options, "seeds_2", SEEDS_SOLVER_TYPES, "phi_1")
    return _run_seeds_2(model, x, sigmas, extra_args, callback, noise, pick(options.eta, 1.0),
                        pick(options.s_noise, 1.0), pick(options.r, 0.5), solver)


def exp_heun_2_x0(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """Exponential Heun (second order) in x0 and lambda: SEEDS-2 with r = 1, no noise."""
    solver = solver_type(options, "exp_heun_2_x0", SEEDS_SOLVER_TYPES, "phi_2")
    return _run_seeds_2(model, x, sigmas, extra_args, callback, noise, 0.0, 0.0, 1.0, solver)


def exp_heun_2_x0_sde(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """Stochastic exponential Heun: SEEDS-2 with r = 1 and phi_2 (eta 1)."""
    solver = solver_type(options, "exp_heun_2_x0_sde", SEEDS_SOLVER_TYPES, "phi_2")
    return _run_seeds_2(model, x, sigmas, extra_args, callback, noise, pick(options.eta, 1.0),
                        pick(options.s_noise, 1.0), 1.0, solver)


def _seeds_3_step(model: Model, extra_args: Mapping[str, object], eta: float, r_1: float,
                  r_2: float) -> Callable[..., Tensor]:
    def step(x: Tensor, sigma: Tensor, sigma_next: Tensor, h: Tensor, denoised: Tensor,
             sde_noise: _SdeNoise | None, s_noise: float, s_in: Tensor) -> Tensor:
        h_eta = h * (eta + 1)
        lambda_s, lambda_t = half_log_snr(sigma), half_log_snr(sigma_next)
        lambda_1 = torch.lerp(lambda_s, lambda_t, r_1)
        lambda_2 = torch.lerp(lambda_s, lambda_t, r_2)
        sigma_1, sigma_2 = sigma_at(lambda_1), sigma_at(lambda_2)
        alpha_1, alpha_2 = sigma_1 * lambda_1.exp(), sigma_2 * lambda_2.exp()
        alpha_t = sigma_next * lambda_t.exp()
        x_2 = (sigma_1 / sigma * (-r_1 * h * eta).exp() * x
               - alpha_1 * _h_phi_1(-r_1 * h_eta) * denoised)
        if sde_noise is not None:
            x_2 = x_2 + sde_noise.advance(0.0, r_1, sigma, sigma_1) * sigma_1 * s_noise
        denoised_2 = model(x_2, sigma_1 * s_in, **extra_args)
        a3_2 = r_2 / r_1 * _h_phi_2(-r_2 * h_eta)
        a3_1 = _h_phi_1(-r_2 * h_eta) - a3_2
        x_3 = (sigma_2 / sigma * (-r_2 * h * eta).exp() * x
               - alpha_2 * (a3_1 * denoised + a3_2 * denoised_2))
        if sde_noise is not None:
            x_3 = x_3 + sde_noise.advance(r_1, r_2, sigma_1, sigma_2) * sigma_2 * s_noise
        denoised_3 = model(x_3, sigma_2 * s_in, **extra_args)
        b3 = _h_phi_2(-h_eta) / r_2
        b1 = _h_phi_1(-h_eta) - b3
        x = sigma_next / sigma * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b3 * denoised_3)
        if sde_noise is not None:
            x = x + sde_noise.advance(r_2, 1.0, sigma_2, sigma_next) * sigma_next * s_noise
        return x

    return step


def seeds_3(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """SEEDS-3: three stages at ratios r_1 = 1/3 and r_2 = 2/3 of each step (eta 1)."""
    eta = pick(options.eta, 1.0)
    step = _seeds_3_step(model, extra_args, eta, pick(options.r_1, 1 / 3), pick(options.r_2, 2 / 3))
    return _seeds(model, x, sigmas, extra_args, callback, noise, eta, pick(options.s_noise, 1.0),
                  step)


def _er_sde_scaler(solver: str, eta: float) -> Callable[[Tensor], Tensor]:
    """ER-SDE's noise scale function f(lambda), lambda = sigma / alpha: the paper's
    f = lambda (e^(lambda^0.3) + 10) for "ER-SDE", else the reverse-time SDE's lambda^(eta + 1)
    (with eta 0 the probability-flow ODE)."""
    if solver == "ER-SDE":
        return lambda lam: lam * ((lam**0.3).exp() + 10.0)
    return lambda lam: lam ** (eta + 1)


def er_sde(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """ER-SDE-Solver-3 (VP, data prediction): up to max_stage (3) stages from the x0 history.

    solver_type "ER-SDE" (default) uses the paper's noise scale; "Reverse-time SDE" scales
    with eta; "ODE" (or eta 0 there) injects no noise.
    """
    solver = solver_type(options, "er_sde", ER_SDE_SOLVER_TYPES, "ER-SDE")
    eta, s_noise = pick(options.eta, 1.0), pick(options.s_noise, 1.0)
    if solver == "ODE" or (solver == "Reverse-time SDE" and eta == 0):
        eta, s_noise = 0.0, 0.0
    scaler = _er_sde_scaler(solver, eta)
    max_stage = pick(options.max_stage, 3)
    draw = noise.gaussian(x)
    s_in = x.new_ones([x.shape[0]])
    lambdas = half_log_snr(sigmas).neg().exp()  # sigma / alpha
    points = torch.arange(0, ER_SDE_INTEGRATION_POINTS, dtype=torch.float32, device=x.device)
    old_denoised = old_denoised_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        notify(callback, i, x, denoised, sigmas[i])
        if sigmas[i + 1] == 0:
            x, old_denoised = denoised, denoised
            continue
        lambda_s, lambda_t = lambdas[i], lambdas[i + 1]
        alpha_s, alpha_t = sigmas[i] / lambda_s, sigmas[i + 1] / lambda_t
        r = scaler(lambda_t) / scaler(lambda_s)
        x = alpha_t / alpha_s * r * x + alpha_t * (1 - r) * denoised
        if min(max_stage, i + 1) >= 2:
            dt = lambda_t - lambda_s
            step = -dt / ER_SDE_INTEGRATION_POINTS
            positions = lambda_t + points * step
            scaled = scaler(positions)
            denoised_d = (denoised - old_denoised) / (lambda_s - lambdas[i - 1])
            integral = torch.sum(1 / scaled) * step
            x = x + alpha_t * (dt + integral * scaler(lambda_t)) * denoised_d
            if min(max_stage, i + 1) >= 3:
                integral_u = torch.sum((positions - lambda_s) / scaled) * step
                denoised_u = (denoised_d - old_denoised_d) / ((lambda_s - lambdas[i - 2]) / 2)
                x = x + alpha_t * ((dt**2) / 2 + integral_u * scaler(lambda_t)) * denoised_u
            old_denoised_d = denoised_d
        if s_noise > 0:
            spread = (lambda_t**2 - lambda_s**2 * r**2).sqrt().nan_to_num(nan=0.0)
            x = x + alpha_t * draw(sigmas[i], sigmas[i + 1]) * s_noise * spread
        old_denoised = denoised
    return x
