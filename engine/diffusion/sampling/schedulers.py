"""Noise schedules: the descending sigma arrays samplers walk, as ComfyUI computes them.

Every scheduler returns a float32 tensor that starts at (or near) sigma_max and ends in 0.
Most have ``steps + 1`` entries; ``ddim_uniform`` and ``beta`` can have a different count
(they pick table entries and drop repeats), exactly as ComfyUI's do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType

import numpy
import torch
from torch import Tensor

from engine.diffusion.networks.model_sampling import ModelSampling


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) eq. 5: linear in sigma^(1/rho) from sigma_max to sigma_min."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Evenly spaced in log(sigma) from sigma_max to sigma_min."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> Tensor:
    """log(sigma) follows ramp^rho from log(sigma_max) down to log(sigma_min)."""
    ramp = torch.linspace(1, 0, n) ** rho
    log_range = math.log(sigma_max) - math.log(sigma_min)
    return _append_zero(torch.exp(ramp * log_range + math.log(sigma_min)))


def vp(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> Tensor:
    """The continuous VP-SDE (Song et al. 2021): sigma(t) = sqrt(e^(beta_d t^2 / 2 + beta_min t)
    - 1) at n times evenly spaced from 1 down to eps_s."""
    t = torch.linspace(1, eps_s, n)
    return _append_zero(torch.sqrt(torch.special.expm1(beta_d * t**2 / 2 + beta_min * t)))


def laplace(n: int, sigma_min: float, sigma_max: float, mu: float = 0.0,
            beta: float = 0.5) -> Tensor:
    """Tiankai et al. (2024): log(sigma) follows the quantiles of a Laplace(mu, beta) over n
    even points of (0, 1), clamped to [sigma_min, sigma_max]. No 0 is appended (as ComfyUI)."""
    epsilon = 1e-5  # keeps the log finite at the two ends
    u = torch.linspace(0, 1, n)
    log_sigmas = mu - beta * torch.sign(0.5 - u) * torch.log(1 - 2 * torch.abs(0.5 - u) + epsilon)
    return torch.clamp(torch.exp(log_sigmas), min=sigma_min, max=sigma_max)


def normal(model_sampling: ModelSampling, steps: int) -> Tensor:
    """Evenly spaced timesteps from t(sigma_max) to t(sigma_min), mapped back to sigmas."""
    return _timestep_spaced(model_sampling, steps, sgm=False)


def sgm_uniform(model_sampling: ModelSampling, steps: int) -> Tensor:
    """SGM/diffusers "trailing" spacing: steps + 1 even timesteps, the last dropped, then 0."""
    return _timestep_spaced(model_sampling, steps, sgm=True)


def _timestep_spaced(model_sampling: ModelSampling, steps: int, sgm: bool) -> Tensor:
    start = model_sampling.timestep(model_sampling.sigma_max)
    end = model_sampling.timestep(model_sampling.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(model_sampling.sigma(end)), 0, abs_tol=0.00001):
            steps, append_zero = steps + 1, False  # the table already ends at sigma 0
        timesteps = torch.linspace(start, end, steps)
    sigmas = [float(model_sampling.sigma(timestep)) for timestep in timesteps]
    return torch.FloatTensor(sigmas + [0.0] if append_zero else sigmas)


def simple(model_sampling: ModelSampling, steps: int) -> Tensor:
    """Every (table length / steps)-th table sigma, counting down from the top."""
    table = model_sampling.sigmas
    stride = len(table) / steps
    sigmas = [float(table[-(1 + int(index * stride))]) for index in range(steps)]
    return torch.FloatTensor(sigmas + [0.0])


def ddim_uniform(model_sampling: ModelSampling, steps: int) -> Tensor:
    """DDIM's uniform timesteps 1, 1 + k, 1 + 2k, ... (k = 1000 // steps), reversed, then 0."""
    table = model_sampling.sigmas
    if math.isclose(float(table[1]), 0, abs_tol=0.00001):
        steps, sigmas = steps + 1, []
    else:
        sigmas = [0.0]
    stride = max(len(table) // steps, 1)
    sigmas += [float(table[index]) for index in range(1, len(table), stride)]
    return torch.FloatTensor(sigmas[::-1])


def beta(
    model_sampling: ModelSampling, steps: int, alpha: float = 0.6, beta: float = 0.6
) -> Tensor:
    """Lee et al. (2024), arXiv 2407.12173: timesteps at quantiles of a Beta(alpha, beta).

    Timestep ``rint(999 * F^-1(1 - i / steps))`` for i = 0..steps-1, repeats dropped.
    """
    if not (alpha > 0 and beta > 0):
        raise ValueError(f"the beta scheduler needs alpha and beta above 0, got alpha={alpha}, "
                         f"beta={beta}; 0.6 and 0.6 are the usual values")
    last_index = len(model_sampling.sigmas) - 1
    quantiles = 1 - numpy.linspace(0, 1, steps, endpoint=False)
    timesteps = numpy.rint(
        numpy.array([beta_ppf(float(q), alpha, beta) for q in quantiles]) * last_index
    )
    sigmas, previous = [], -1.0
    for timestep in timesteps:
        if timestep != previous:
            sigmas.append(float(model_sampling.sigmas[int(timestep)]))
        previous = timestep
    return torch.FloatTensor(sigmas + [0.0])


def linear_quadratic(
    model_sampling: ModelSampling,
    steps: int,
    threshold_noise: float = 0.025,
    linear_steps: int | None = None,
) -> Tensor:
    """Mochi's schedule (Genmo 2024): linear to threshold_noise, then quadratic, times sigma_max."""
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        linear_steps = steps // 2 if linear_steps is None else linear_steps
        linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        threshold_noise_step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        quadratic_coef = threshold_noise_step_diff / (linear_steps * quadratic_steps**2)
        linear_coef = threshold_noise / linear_steps - 2 * threshold_noise_step_diff / (
            quadratic_steps**2
        )
        const = quadratic_coef * (linear_steps**2)
        quadratic = [
            quadratic_coef * (i**2) + linear_coef * i + const for i in range(linear_steps, steps)
        ]
        schedule = [1.0 - value for value in linear + quadratic + [1.0]]
    return torch.FloatTensor(schedule) * model_sampling.sigma_max.cpu()


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Evenly spaced in arctan(sigma) (AYS/"KL-optimal", A1111 PR 15608)."""
    if n < 2:
        raise ValueError(
            f"the kl_optimal scheduler needs at least 2 steps, got {n} (ComfyUI divides by "
            "steps - 1 and returns NaN); use 2 or more steps or another scheduler"
        )
    fractions = torch.arange(n, dtype=torch.float).div_(n - 1)
    sigmas = fractions.new_zeros(n + 1)
    angles = fractions * math.atan(sigma_min) + (1 - fractions) * math.atan(sigma_max)
    sigmas[:-1] = angles.tan_()
    return sigmas


def sd_turbo(model_sampling: ModelSampling, steps: int, denoise: float) -> Tensor:
    """SDTurboScheduler: timesteps 999, 899, ..., 99; denoise < 1 skips the first ones."""
    start_step = 10 - int(10 * denoise)
    timesteps = torch.flip(torch.arange(1, 11) * 100 - 1, (0,))[start_step : start_step + steps]
    return _append_zero(model_sampling.sigma(timesteps))


def _from_range(function: Callable[[int, float, float], Tensor]) -> Callable[..., Tensor]:
    def scheduler(model_sampling: ModelSampling, steps: int) -> Tensor:
        sigma_min, sigma_max = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
        return function(steps, sigma_min, sigma_max)

    scheduler.__doc__ = function.__doc__
    return scheduler


# ComfyUI's order, which is the order of the KSampler "scheduler" combo.
SCHEDULERS: Mapping[str, Callable[[ModelSampling, int], Tensor]] = MappingProxyType(
    {
        "simple": simple,
        "sgm_uniform": sgm_uniform,
        "karras": _from_range(karras),
        "exponential": _from_range(exponential),
        "ddim_uniform": ddim_uniform,
        "beta": beta,
        "normal": normal,
        "linear_quadratic": linear_quadratic,
        "kl_optimal": _from_range(kl_optimal),
    }
)
SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)

# Samplers for which KSampler computes one extra step and drops the second-to-last sigma.
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})


def calculate_sigmas(model_sampling: ModelSampling, scheduler_name: str, steps: int) -> Tensor:
    """The full schedule of ``steps`` steps from the named scheduler."""
    scheduler = SCHEDULERS.get(scheduler_name)
    if scheduler is None:
        raise ValueError(
            f"unknown scheduler {scheduler_name!r}; valid schedulers: {', '.join(SCHEDULER_NAMES)}"
        )
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return scheduler(model_sampling, steps)


def sigmas_for(
    model_sampling: ModelSampling,
    scheduler: str,
    steps: int,
    denoise: float = 1.0,
    *,
    sampler_name: str | None = None,
) -> Tensor:
    """KSampler's schedule: ``steps`` steps covering the last ``denoise`` of the full path.

    denoise > 0.9999 gives the full schedule; denoise <= 0 gives an empty tensor (nothing to
    sample); otherwise the schedule of int(steps / denoise) steps is computed and its last
    steps + 1 sigmas kept. For dpm_2, dpm_2_ancestral, uni_pc and uni_pc_bh2 (pass
    ``sampler_name``) each schedule is computed with one step more and its second-to-last
    sigma dropped. BasicScheduler uses the same rule but switches at denoise < 1.0.
    """
    if denoise <= 0.0:
        return torch.FloatTensor([])
    total_steps = steps if denoise > 0.9999 else int(steps / denoise)
    sigmas = _ksampler_sigmas(model_sampling, scheduler, total_steps, sampler_name)
    return sigmas if denoise > 0.9999 else sigmas[-(steps + 1) :]


def step_range(
    sigmas: Tensor, start_step: int | None, last_step: int | None, force_full_denoise: bool
) -> Tensor | None:
    """KSamplerAdvanced's part of a schedule: steps start_step up to last_step.

    Cutting at ``last_step`` keeps sigmas[:last_step + 1] and, with ``force_full_denoise``
    (return_with_leftover_noise disabled), sets the new last sigma to 0. None means the start
    is at or past the end: there is nothing to sample and the input latent is the result.
    """
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[: last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step >= len(sigmas) - 1:
            return None
        sigmas = sigmas[start_step:]
    return sigmas


def _ksampler_sigmas(
    model_sampling: ModelSampling, scheduler: str, steps: int, sampler_name: str | None
) -> Tensor:
    if sampler_name not in DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
        return calculate_sigmas(model_sampling, scheduler, steps)
    sigmas = calculate_sigmas(model_sampling, scheduler, steps + 1)
    return torch.cat([sigmas[:-2], sigmas[-1:]])


# --- Beta distribution quantile (the beta scheduler), without scipy --------------------------


def _log_beta_function(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _incomplete_beta_fraction(x: float, a: float, b: float) -> float:
    """Continued fraction of I_x(a, b), modified Lentz's method (Numerical Recipes 6.4)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return fraction


def beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) - _log_beta_function(a, b)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _incomplete_beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_fraction(1.0 - x, b, a) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """The quantile x with I_x(a, b) = q, by bisection to the last bit of a double."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    if a == b and q == 0.5:
        return 0.5  # symmetric distribution: the median is exactly one half
    low, high = 0.0, 1.0
    while True:
        middle = 0.5 * (low + high)
        if middle in (low, high):
            return middle
        if beta_cdf(middle, a, b) < q:
            low = middle
        else:
            high = middle
