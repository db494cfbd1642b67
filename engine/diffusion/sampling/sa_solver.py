"""SA-Solver, the stochastic Adams solver (Xue et al., NeurIPS 2023, arXiv 2309.05019), in
data prediction and lambda = -log(sigma), with its predictor-corrector steps.

Over a step from lambda_s to lambda_t the SDE with noise strength tau gives
``x_t = sigma_t / sigma_s * e^(-tau^2 h) x_s + sum_j b_j D_j + noise`` (eqs. 15 and 18):
the x0 estimates D_j at the last few lambdas are interpolated by a Lagrange polynomial and
integrated against the exponential kernel, ``b_j = alpha_t (1 + tau^2) * integral of
e^((1 + tau^2)(lambda - lambda_t)) l_j(lambda)``. The predictor extrapolates from past
estimates to lambda_t; the corrector, once the model has been evaluated at lambda_t,
redoes the previous step including that estimate. tau is ``eta`` inside the SDE interval
[sde_end_sigma, sde_start_sigma] and 0 (an ODE step) outside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from engine.diffusion.networks.model_sampling import ModelSampling, model_sampling
from engine.diffusion.sampling.noise import NoiseSource
from engine.diffusion.sampling.samplers_common import (
    Callback,
    Model,
    SamplerOptions,
    half_log_snr,
    notify,
    pick,
)

SDE_START_PERCENT, SDE_END_PERCENT = 0.2, 0.8  # the default SDE interval, in sampling percent


def sde_interval(sampling: ModelSampling, start_percent: float = SDE_START_PERCENT,
                 end_percent: float = SDE_END_PERCENT) -> tuple[float, float]:
    """(sde_start_sigma, sde_end_sigma) of a model's schedule for two sampling percents."""
    return sampling.percent_to_sigma(start_percent), sampling.percent_to_sigma(end_percent)


def exponential_integrals(lambda_s: Tensor, lambda_t: Tensor, count: int, tau: float) -> Tensor:
    """I_p = k * integral over [lambda_s, lambda_t] of e^(k (lambda - lambda_t)) lambda^p for
    p < count, k = 1 + tau^2.

    Integrating by parts, I_p = P_p - p / k I_(p-1) with P_q = lambda_t^q - lambda_s^q e^(-k h),
    so I_p = sum over q <= p of (-1)^(p-q) p! / q! k^(q-p) P_q; the weights are formed in log
    space (lgamma) and applied as one matrix product, in the sigmas' dtype as ComfyUI does (the
    Vandermonde solve that follows is sensitive to the last bits at high orders).
    """
    k = 1 + tau**2
    powers = torch.arange(count, dtype=lambda_s.dtype, device=lambda_s.device)
    ends = lambda_t**powers - lambda_s**powers * (-k * (lambda_t - lambda_s)).exp()
    depth = powers.unsqueeze(1) - powers.unsqueeze(0)  # p - q
    log_factorials = (powers + 1).lgamma()
    log_weights = log_factorials.unsqueeze(1) - log_factorials.unsqueeze(0)
    if tau > 0:
        log_weights = log_weights - depth * math.log(k)
    signs = torch.where(depth % 2 == 0, 1.0, -1.0)
    return (log_weights.exp() * signs).tril() @ ends


def adams_weights(sigma_t: Tensor, nodes: Tensor, lambda_s: Tensor, lambda_t: Tensor,
                  tau: float) -> Tensor:
    """b_j for the x0 estimates at `nodes` (oldest first): the Lagrange basis integrals are
    the weights that reproduce every I_p, the solution of V^T b = I with V_jp = nodes_j^p."""
    integrals = exponential_integrals(lambda_s, lambda_t, len(nodes), tau)
    vandermonde = torch.vander(nodes, len(nodes), increasing=True)
    return sigma_t * lambda_t.exp() * torch.linalg.solve(vandermonde.T, integrals)


def simple_order_2_weights(sigma_t: Tensor, nodes: Tensor, lambda_s: Tensor, lambda_t: Tensor,
                           tau: float, corrector: bool) -> Tensor:
    """The paper's simple two-point weights (appendix D), oldest first."""
    k = 1 + tau**2
    h = lambda_t - lambda_s
    alpha_t = sigma_t * lambda_t.exp()
    total = alpha_t * (-h * k).expm1().neg()
    if corrector:
        newest = alpha_t * (0.5 * k * h)
        return torch.stack([total - newest, newest])
    oldest = alpha_t * (0.5 * k * h**2) / (nodes[-2] - lambda_s)
    return torch.stack([oldest, total - oldest])


def _weights(sigma_t: Tensor, nodes: Tensor, lambda_s: Tensor, lambda_t: Tensor, tau: float,
             simple_order_2: bool, corrector: bool) -> Tensor:
    if simple_order_2 and len(nodes) == 2:
        return simple_order_2_weights(sigma_t, nodes, lambda_s, lambda_t, tau, corrector)
    return adams_weights(sigma_t, nodes, lambda_s, lambda_t, tau)


def _combine(weights: Tensor, estimates: Sequence[Tensor]) -> Tensor:
    """sum_j weights_j * estimates_j (one contraction over a stacked (B, K, ...) tensor)."""
    return torch.tensordot(torch.stack(list(estimates), dim=1), weights, dims=([1], [0]))


def _tau(options: SamplerOptions) -> tuple[float, float, float]:
    """(eta, sde_start_sigma, sde_end_sigma) with the defaults filled in."""
    start, end = options.sde_start_sigma, options.sde_end_sigma
    if start is None or end is None:
        default_start, default_end = sde_interval(model_sampling())
        start, end = pick(start, default_start), pick(end, default_end)
    return pick(options.eta, 1.0), start, end


def _sa_solver(model: Model, x: Tensor, sigmas: Tensor, extra_args: Mapping[str, object],
               callback: Callback | None, noise: NoiseSource, options: SamplerOptions,
               use_pece: bool) -> Tensor:
    if len(sigmas) <= 1:
        return x
    eta, start_sigma, end_sigma = _tau(options)

    def tau_at(sigma: Tensor) -> float:
        return eta if eta > 0 and start_sigma >= float(sigma) >= end_sigma else 0.0

    s_noise, simple = pick(options.s_noise, 1.0), pick(options.simple_order_2, False)
    predictor_order = pick(options.predictor_order, 3)
    corrector_order = pick(options.corrector_order, 4)
    draw = noise.gaussian(x)
    s_in = x.new_ones([x.shape[0]])
    lambdas = half_log_snr(sigmas)
    lower_order_to_end = float(sigmas[-1]) == 0
    x_pred, tau = x, 0.0
    h, step_noise = lambdas.new_zeros(()), x.new_zeros(())  # set by each predictor step
    estimates: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x_pred, sigma * s_in, **extra_args)
        notify(callback, i, x_pred, denoised, sigma)
        estimates = (estimates + [denoised])[-max(predictor_order, corrector_order):]
        predictor_used = min(predictor_order, len(estimates))
        corrector_used = 0
        if i > 0 and (sigma_next != 0 or use_pece):
            corrector_used = min(corrector_order, len(estimates))
        if lower_order_to_end:  # lower orders near the end, for stability
            predictor_used = min(predictor_used, len(sigmas) - 2 - i)
            corrector_used = min(corrector_used, len(sigmas) - 1 - i)
        if corrector_used == 0:
            x = x_pred
        else:
            weights = _weights(sigma, lambdas[i - corrector_used + 1:i + 1], lambdas[i - 1],
                               lambdas[i], tau, simple, corrector=True)
            x = sigma / sigmas[i - 1] * (-(tau**2) * h).exp() * x \
                + _combine(weights, estimates[-corrector_used:])
            if tau > 0 and s_noise > 0:
                x = x + step_noise
            if use_pece:
                denoised = model(x, sigma * s_in, **extra_args)
                estimates[-1] = denoised
        if sigma_next == 0:
            x_pred = denoised
            continue
        tau = tau_at(sigma_next)
        weights = _weights(sigma_next, lambdas[i - predictor_used + 1:i + 1], lambdas[i],
                           lambdas[i + 1], tau, simple, corrector=False)
        h = lambdas[i + 1] - lambdas[i]
        x_pred = sigma_next / sigma * (-(tau**2) * h).exp() * x \
            + _combine(weights, estimates[-predictor_used:])
        if tau > 0 and s_noise > 0:
            step_noise = draw(sigma, sigma_next) * sigma_next \
                * (-2 * tau**2 * h).expm1().neg().sqrt() * s_noise
            x_pred = x_pred + step_noise
    return x_pred


def sa_solver(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """SA-Solver: predictor order 3, corrector order 4, SDE (eta 1) from 20% to 80% of the
    schedule."""
    return _sa_solver(model, x, sigmas, extra_args, callback, noise, options,
                      pick(options.use_pece, False))


def sa_solver_pece(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """SA-Solver in PECE mode: predict, evaluate, correct, evaluate the corrected state again."""
    return _sa_solver(model, x, sigmas, extra_args, callback, noise, options, True)
