"""DPM-Solver (Lu et al. 2022, arXiv 2206.00927): fixed-step "fast" and adaptive-step forms.

Both ignore the inner sigmas of the schedule: they integrate in t = -log(sigma) from the
first sigma down to the last non-zero one and return the latent there (no final denoise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.diffusion.sampling.noise import NoiseSource, StepNoise
from engine.diffusion.sampling.samplers_common import (
    Callback,
    Model,
    SamplerOptions,
    ancestral_step,
    half_log_snr,
    pick,
    sigma_at,
)

EpsFunction = Callable[[str, Tensor, Tensor], Tensor]




def _memoised_eps(model: Model, extra_args: Mapping[str, object]) -> EpsFunction:
    """eps(key, x, t) = (x - D(x, sigma(t))) / sigma(t), computed once per key within a step."""
    cache: dict[str, Tensor] = {}

    def eps(key: str, x: Tensor, t: Tensor) -> Tensor:
        if key not in cache:
            sigma = sigma_at(t) * x.new_ones([x.shape[0]])
            cache[key] = (x - model(x, sigma, **extra_args)) / sigma_at(t)
        return cache[key]

    return eps


def _step_1(eps: EpsFunction, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """DPM-Solver-1 (= DDIM): x_t = x_s - sigma_t (e^h - 1) eps_s."""
    h = t_next - t
    return x - sigma_at(t_next) * h.expm1() * eps("eps", x, t)


def _step_2(eps: EpsFunction, x: Tensor, t: Tensor, t_next: Tensor, r1: float = 1 / 2) -> Tensor:
    """DPM-Solver-2 (Algorithm 4 of the paper) with intermediate point s1 = t + r1 h."""
    h = t_next - t
    eps_0 = eps("eps", x, t)
    s1 = t + r1 * h
    u1 = x - sigma_at(s1) * (r1 * h).expm1() * eps_0
    eps_r1 = eps("eps_r1", u1, s1)
    return (
        x
        - sigma_at(t_next) * h.expm1() * eps_0
        - sigma_at(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps_0)
    )


def _step_3(
    eps: EpsFunction, x: Tensor, t: Tensor, t_next: Tensor, r1: float = 1 / 3, r2: float = 2 / 3
) -> Tensor:
    """DPM-Solver-3 (Algorithm 5 of the paper) with intermediate points at r1 and r2."""
    h = t_next - t
    eps_0 = eps("eps", x, t)
    s1, s2 = t + r1 * h, t + r2 * h
    u1 = x - sigma_at(s1) * (r1 * h).expm1() * eps_0
    eps_r1 = eps("eps_r1", u1, s1)
    u2 = (
        x
        - sigma_at(s2) * (r2 * h).expm1() * eps_0
        - sigma_at(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps_0)
    )
    eps_r2 = eps("eps_r2", u2, s2)
    return (
        x
        - sigma_at(t_next) * h.expm1() * eps_0
        - sigma_at(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps_0)
    )


def _endpoints(sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """(t at the first sigma, t at the last non-zero sigma)."""
    sigma_min = sigmas[-2] if sigmas[-1] == 0 else sigmas[-1]
    sigma_max = sigmas[0]
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError(
            f"DPM-Solver needs positive end sigmas, got {float(sigma_max)} and {float(sigma_min)}"
        )
    return half_log_snr(sigma_max.clone()), half_log_snr(sigma_min.clone())


def _noisy_target(
    t: Tensor, t_next: Tensor, t_end: Tensor, eta: float
) -> tuple[Tensor, Tensor | float]:
    """Where the deterministic part of a step lands and how much noise restores t_next."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = ancestral_step(sigma_at(t), sigma_at(t_next), eta)
    t_down = torch.minimum(t_end, half_log_snr(sigma_down))
    return t_down, (sigma_at(t_next) ** 2 - sigma_at(t_down) ** 2) ** 0.5


def dpm_fast(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """DPM-Solver-fast (Lu et al. 2022 sec. 3.4): len(sigmas) - 1 evaluations in order-3 steps."""
    if len(sigmas) <= 1:
        return x
    eta, s_noise = pick(options.eta, 0.0), pick(options.s_noise, 1.0)
    t_start, t_end = _endpoints(sigmas)
    if eta and not t_end > t_start:
        raise ValueError("eta must be 0 when sampling towards higher sigma")
    nfe = len(sigmas) - 1
    m = math.floor(nfe / 3) + 1
    ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    draw = noise.gaussian(x)
    for i, order in enumerate(orders):
        eps = _memoised_eps(model, extra_args)
        t, t_next = ts[i], ts[i + 1]
        t_target, sigma_up = _noisy_target(t, t_next, t_end, eta)
        denoised = x - sigma_at(t) * eps("eps", x, t)
        if callback is not None:
            callback(i, x, denoised, sigma_at(t))
        step = {1: _step_1, 2: _step_2, 3: _step_3}[order]
        x = step(eps, x, t, t_target)
        if sigma_up:
            x = x + sigma_up * s_noise * draw(sigma_at(t), sigma_at(t_next))
    return x


@dataclass(frozen=True)
class _StepController:
    """PID step-size control for ODE solvers (Söderlind 2003), as in k-diffusion."""

    b1: float
    b2: float
    b3: float
    accept_safety: float
    eps: float = 1e-8

    @staticmethod
    def create(options: SamplerOptions, order: float) -> _StepController:
        pcoeff, icoeff = pick(options.pcoeff, 0.0), pick(options.icoeff, 1.0)
        dcoeff = pick(options.dcoeff, 0.0)
        return _StepController(
            (pcoeff + icoeff + dcoeff) / order,
            -(pcoeff + 2 * dcoeff) / order,
            dcoeff / order,
            pick(options.accept_safety, 0.81),
        )

    def propose(
        self, error: Tensor, h: float, history: tuple[float, ...]
    ) -> tuple[bool, float, tuple[float, ...]]:
        """(accepted, next h, next inverse-error history) for a step with this error."""
        inv_error = 1 / (float(error) + self.eps)
        previous = history or (inv_error, inv_error, inv_error)
        factor = inv_error**self.b1 * previous[1] ** self.b2 * previous[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            history = (inv_error, inv_error, previous[1])
        else:
            history = (inv_error, previous[1], previous[2])
        return accept, h * factor, history


def dpm_adaptive(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """DPM-Solver-12/23 with adaptive step size (Lu et al. 2022 sec. 4.2, Algorithm 2)."""
    if len(sigmas) <= 1:
        return x
    order = pick(options.order, 3)
    if order not in (2, 3):
        raise ValueError(f"dpm_adaptive supports order 2 or 3, got {order}")
    eta, s_noise = pick(options.eta, 0.0), pick(options.s_noise, 1.0)
    t_start, t_end = _endpoints(sigmas)
    forward = bool(t_end > t_start)  # False: towards higher sigma (inversion), eta must be 0
    if eta and not forward:
        raise ValueError("eta must be 0 when sampling towards higher sigma")
    atol, rtol = torch.tensor(pick(options.atol, 0.0078)), torch.tensor(pick(options.rtol, 0.05))
    controller = _StepController.create(options, 1.5 if eta else order)
    h = abs(pick(options.h_init, 0.05)) * (1 if forward else -1)
    history: tuple[float, ...] = ()
    draw: StepNoise = noise.gaussian(x)
    s, x_prev, step_index = t_start, x, 0
    while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
        eps = _memoised_eps(model, extra_args)
        t = torch.minimum(t_end, s + h) if forward else torch.maximum(t_end, s + h)
        t_target, sigma_up = _noisy_target(s, t, t_end, eta)
        denoised = x - sigma_at(s) * eps("eps", x, s)
        if order == 2:
            x_low, x_high = _step_1(eps, x, s, t_target), _step_2(eps, x, s, t_target)
        else:
            x_low = _step_2(eps, x, s, t_target, r1=1 / 3)
            x_high = _step_3(eps, x, s, t_target)
        delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        accept, h, history = controller.propose(error, h, history)
        if accept:
            x_prev = x_low
            x = x_high + sigma_up * s_noise * draw(sigma_at(s), sigma_at(t)) if sigma_up else x_high
            s = t
        if callback is not None:
            callback(step_index, x, denoised, sigma_at(s))
        step_index += 1
    return x
