"""Linear multistep samplers on the Karras ODE dx/dsigma = d: LMS, iPNDM, iPNDM-v and DEIS."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy
import torch
from torch import Tensor

from engine.diffusion.sampling.noise import NoiseSource
from engine.diffusion.sampling.samplers_common import (
    Callback,
    Model,
    SamplerOptions,
    notify,
    pick,
    to_d,
)


def lagrange_integral(nodes: Sequence[float], j: int, start: float, end: float) -> float:
    """Integral over [start, end] of the Lagrange basis polynomial of nodes[j].

    Gauss-Legendre quadrature with len(nodes) points, exact for this polynomial of degree
    len(nodes) - 1 (ComfyUI integrates the same polynomial numerically with scipy's quad).
    """
    points, weights = numpy.polynomial.legendre.leggauss(len(nodes))
    half, middle = (end - start) / 2, (end + start) / 2
    total = 0.0
    for point, weight in zip(points, weights, strict=True):
        tau = middle + half * float(point)
        basis = 1.0
        for k, node in enumerate(nodes):
            if k != j:
                basis *= (tau - node) / (nodes[j] - node)
        total += float(weight) * basis
    return total * half


def _lms_coefficients(sigmas: Sequence[float], i: int, order: int) -> list[float]:
    """Adams-Bashforth weights for d_i, d_{i-1}, ... over [sigma_i, sigma_{i+1}]."""
    nodes = [sigmas[i - k] for k in range(order)]
    return [lagrange_integral(nodes, j, sigmas[i], sigmas[i + 1]) for j in range(order)]


def lms(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """Linear multistep (Adams-Bashforth) in sigma with exact Lagrange weights (k-diffusion)."""
    order = pick(options.order, 4)
    sigma_values = [float(sigma) for sigma in sigmas]
    s_in = x.new_ones([x.shape[0]])
    ds: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        ds = (ds + [to_d(x, sigmas[i], denoised)])[-order:]
        notify(callback, i, x, denoised, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        coefficients = _lms_coefficients(sigma_values, i, min(i + 1, order))
        pairs = zip(coefficients, reversed(ds), strict=True)
        x = x + sum(coefficient * d for coefficient, d in pairs)
    return x


# Adams-Bashforth weights for equal steps, newest derivative first, over a common
# denominator (the iPNDM warm start and steady state, Zhang & Chen 2023).
_ADAMS_BASHFORTH = (((1,), 1), ((3, -1), 2), ((23, -16, 5), 12), ((55, -59, 37, -9), 24))


# (step index, order, current step size) -> (weights newest first, common denominator)
WeightsFor = Callable[[int, int, Tensor], tuple[Sequence[Any], int]]


def _check_max_order(name: str, max_order: int) -> None:
    if not 1 <= max_order <= 4:
        raise ValueError(f"{name} supports a max order from 1 to 4, got {max_order}")


def _remember(history: list[Tensor], d: Tensor, max_order: int) -> list[Tensor]:
    """The last max_order - 1 derivatives, oldest first."""
    return (history + [d])[-(max_order - 1) :] if max_order > 1 else []


def _adams_bashforth_sampler(name: str, model: Model, x: Tensor, sigmas: Tensor,
                             extra_args: Mapping[str, object], callback: Callback | None,
                             options: SamplerOptions, weights_for: WeightsFor) -> Tensor:
    """The iPNDM loop: Euler warm start, then Adams-Bashforth steps over the last derivatives,
    whose weights `weights_for(i, order, h)` gives as (weights, denominator)."""
    max_order = pick(options.order, 4)
    _check_max_order(name, max_order)
    s_in = x.new_ones([x.shape[0]])
    history: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, t_cur * s_in, **extra_args)
        notify(callback, i, x, denoised, t_cur)
        d_cur = (x - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + (t_next - t_cur) * d_cur
        else:
            weights, denominator = weights_for(i, order, t_next - t_cur)
            combined = weights[0] * d_cur
            for weight, d_old in zip(weights[1:], reversed(history), strict=True):
                combined = combined + weight * d_old
            x_next = x + (t_next - t_cur) * combined / denominator
        history = _remember(history, d_cur, max_order)
        x = x_next
    return x


def ipndm(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """Improved PNDM (Zhang & Chen 2023): fixed Adams-Bashforth weights, warm-started by Euler."""
    return _adams_bashforth_sampler("ipndm", model, x, sigmas, extra_args, callback, options,
                                    lambda i, order, h: _ADAMS_BASHFORTH[order - 1])


def _ipndm_v_coefficients(h: Sequence[Tensor], order: int) -> list[Tensor]:
    """Variable-step Adams-Bashforth weights; h = (h_n, h_n-1, ...) the latest step sizes."""
    h0, h1 = h[0], h[1]
    q = h0 / h1
    if order == 2:
        return [(2 + q) / 2, -q / 2]
    h2 = h[2]
    s01, s12 = h0 + h1, h1 + h2
    temp1 = (1 - h0 / (3 * s01) * (h0 * s01) / (h1 * s12)) / 2
    if order == 3:
        return [(2 + q) / 2 + temp1, -q / 2 - (1 + h1 / h2) * temp1, temp1 * h1 / h2]
    h3 = h[3]
    s012, s123 = h0 + h1 + h2, h1 + h2 + h3
    rho = h1 * s12 / (h2 * (h2 + h3))
    temp2 = ((1 - h0 / (3 * s01)) / 2 + (1 - h0 / (2 * s01)) * h0 / (6 * s012)) * (
        h0 * s01 * s012
    ) / (h1 * s12 * s123)
    return [
        (2 + q) / 2 + temp1 + temp2,
        -q / 2 - (1 + h1 / h2) * temp1 - (1 + (h1 / h2) + rho) * temp2,
        temp1 * h1 / h2 + ((h1 / h2) + rho * (1 + h2 / h3)) * temp2,
        -temp2 * rho * h1 / h2,
    ]


def ipndm_v(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """iPNDM with variable-step Adams-Bashforth weights (Zhang & Chen 2023; diff-sampler)."""
    def weights_for(i: int, order: int, h: Tensor) -> tuple[list[Tensor], int]:
        steps = [h] + [sigmas[i - k] - sigmas[i - k - 1] for k in range(order - 1)]
        return _ipndm_v_coefficients(steps, order), 1  # x / 1 is exact: same bits as before

    return _adams_bashforth_sampler("ipndm_v", model, x, sigmas, extra_args, callback, options,
                                    weights_for)


def _deis_vp_time(sigmas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """sigma -> t of the linear VP-SDE fitted to EDM's range (eps_s 1e-3, sigma 0.002..80).

    Returns (t for each sigma, beta_0, beta_1) with alpha(t) = exp(-t^2 (b1 - b0) / 2 - t b0).
    Computed on the CPU; the logs of the two range ends are taken by numpy, as in the
    reference implementation.
    """
    sigmas, epsilon_s = sigmas.detach().cpu(), 1e-3
    log_low = torch.tensor(numpy.log((torch.tensor(0.002) ** 2 + 1).numpy()))
    log_high = torch.tensor(numpy.log((torch.tensor(80.0) ** 2 + 1).numpy()))
    beta_d = 2 * (log_low / epsilon_s - log_high) / (epsilon_s - 1)
    beta_min = log_high - 0.5 * beta_d
    t = ((beta_min**2 + 2 * beta_d * (sigmas**2 + 1).log()).sqrt() - beta_min) / beta_d
    return t, beta_min, beta_d + beta_min


def _deis_tab_coefficients(
    t_steps: Tensor, beta_0: Tensor, beta_1: Tensor, i: int, order: int, points: int = 10000
) -> list[Tensor]:
    """DEIS "tAB" weights (Zhang & Chen 2023, eq. 15): Lagrange basis times the exponential
    integrator's kernel, integrated over [t_i, t_i+1] by a 10000-point sum."""
    t_cur, t_next = t_steps[i], t_steps[i + 1]
    taus = torch.linspace(t_cur, t_next, points)
    dtau = (t_next - t_cur) / points
    alpha = torch.exp(-0.5 * taus**2 * (beta_1 - beta_0) - taus * beta_0)
    d_log_alpha = -taus * (beta_1 - beta_0) - beta_0
    kernel = -0.5 * d_log_alpha / torch.sqrt(alpha * (1 - alpha))
    nodes = t_steps[[i - k for k in range(order)]]
    coefficients = []
    for j in range(order):
        basis = torch.ones_like(taus)
        for k in range(order):
            if k != j:
                basis = basis * ((taus - nodes[k]) / (nodes[j] - nodes[k]))
        coefficients.append(torch.sum(kernel * basis) * dtau)
    return coefficients


def deis(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """DEIS, the diffusion exponential integrator sampler (Zhang & Chen 2023), multistep tAB."""
    max_order, mode = pick(options.order, 3), pick(options.deis_mode, "tab")
    _check_max_order("deis", max_order)
    t_steps, beta_0, beta_1 = _deis_vp_time(sigmas)
    sigma_values = [float(sigma) for sigma in sigmas]
    s_in = x.new_ones([x.shape[0]])
    history: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, t_cur * s_in, **extra_args)
        notify(callback, i, x, denoised, t_cur)
        d_cur = (x - denoised) / t_cur
        order = 1 if t_next <= 0 else min(max_order, i + 1)
        if order == 1:
            x_next = x + (t_next - t_cur) * d_cur
        else:
            if mode == "tab":
                weights = _deis_tab_coefficients(t_steps, beta_0, beta_1, i, order)
            else:  # "rhoab": Adams-Bashforth in sigma itself, the LMS weights
                weights = _lms_coefficients(sigma_values, i, order)
            x_next = x + weights[0] * d_cur
            for weight, d_old in zip(weights[1:], reversed(history), strict=True):
                x_next = x_next + weight * d_old
        history = _remember(history, d_cur, max_order)
        x = x_next
    return x
