"""Every scheduler against its formula, computed independently here in float64."""

from __future__ import annotations

import math

import numpy
import pytest
import torch

from engine.diffusion.sampling import (
    SCHEDULER_NAMES,
    calculate_sigmas,
    exponential,
    karras,
    model_sampling,
    polyexponential,
    sd_turbo,
    sigmas_for,
    step_range,
)
from engine.diffusion.sampling.schedulers import beta, beta_cdf, beta_ppf, linear_quadratic

SAMPLING = model_sampling()
TABLE = SAMPLING.sigmas.double().numpy()
SIGMA_MIN, SIGMA_MAX = float(SAMPLING.sigma_min), float(SAMPLING.sigma_max)


def sigma_at(timestep: float) -> float:
    """Log-linear interpolation of the sigma table at a fractional timestep."""
    low, high = math.floor(timestep), math.ceil(timestep)
    weight = timestep - low
    return math.exp((1 - weight) * math.log(TABLE[low]) + weight * math.log(TABLE[high]))


def assert_schedule(actual: torch.Tensor, expected: list[float], rtol: float = 2e-6) -> None:
    assert actual.dtype == torch.float32
    assert actual.shape == (len(expected),)
    numpy.testing.assert_allclose(actual.double().numpy(), expected, rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("steps", [1, 2, 5, 20, 37])
def test_karras_is_linear_in_sigma_to_the_one_over_rho(steps: int) -> None:
    ramp = [i / (steps - 1) if steps > 1 else 0.0 for i in range(steps)]
    lo, hi = SIGMA_MIN ** (1 / 7), SIGMA_MAX ** (1 / 7)
    expected = [(hi + r * (lo - hi)) ** 7 for r in ramp] + [0.0]
    assert_schedule(calculate_sigmas(SAMPLING, "karras", steps), expected)
    assert_schedule(karras(steps, 0.1, 10.0, rho=3.0), [
        (10.0 ** (1 / 3) + r * (0.1 ** (1 / 3) - 10.0 ** (1 / 3))) ** 3 for r in ramp
    ] + [0.0])


@pytest.mark.parametrize("steps", [2, 5, 20])
def test_exponential_and_polyexponential_are_even_in_log_sigma(steps: int) -> None:
    ramp = [i / (steps - 1) for i in range(steps)]
    log_lo, log_hi = math.log(SIGMA_MIN), math.log(SIGMA_MAX)
    expected = [math.exp(log_hi + r * (log_lo - log_hi)) for r in ramp] + [0.0]
    assert_schedule(calculate_sigmas(SAMPLING, "exponential", steps), expected)
    assert_schedule(exponential(steps, SIGMA_MIN, SIGMA_MAX), expected)
    assert_schedule(polyexponential(steps, SIGMA_MIN, SIGMA_MAX, rho=1.0), expected)
    curved = [math.exp((1 - r) ** 2 * (log_hi - log_lo) + log_lo) for r in ramp] + [0.0]
    assert_schedule(polyexponential(steps, SIGMA_MIN, SIGMA_MAX, rho=2.0), curved)


@pytest.mark.parametrize("steps", [1, 3, 10, 25])
def test_normal_is_evenly_spaced_in_timestep(steps: int) -> None:
    timesteps = numpy.linspace(999, 0, steps)
    expected = [sigma_at(t) for t in timesteps] + [0.0]
    assert_schedule(calculate_sigmas(SAMPLING, "normal", steps), expected)


@pytest.mark.parametrize("steps", [1, 3, 10, 25])
def test_sgm_uniform_drops_the_last_of_steps_plus_one_timesteps(steps: int) -> None:
    timesteps = numpy.linspace(999, 0, steps + 1)[:-1]
    expected = [sigma_at(t) for t in timesteps] + [0.0]
    assert_schedule(calculate_sigmas(SAMPLING, "sgm_uniform", steps), expected)


@pytest.mark.parametrize("steps", [1, 3, 7, 20, 33])
def test_simple_takes_every_n_th_table_sigma_from_the_top(steps: int) -> None:
    expected = [TABLE[999 - int(i * 1000 / steps)] for i in range(steps)] + [0.0]
    assert_schedule(calculate_sigmas(SAMPLING, "simple", steps), expected, rtol=0)


@pytest.mark.parametrize("steps", [1, 3, 7, 20, 33])
def test_ddim_uniform_takes_timesteps_one_plus_multiples_of_the_stride(steps: int) -> None:
    stride = 1000 // steps
    expected = [TABLE[t] for t in range(1, 1000, stride)][::-1] + [0.0]
    assert_schedule(calculate_sigmas(SAMPLING, "ddim_uniform", steps), expected, rtol=0)


@pytest.mark.parametrize("steps", [1, 4, 10, 25])
def test_kl_optimal_is_even_in_arctan_sigma(steps: int) -> None:
    if steps == 1:
        with pytest.raises(ValueError, match="at least 2 steps"):
            calculate_sigmas(SAMPLING, "kl_optimal", steps)
        return
    a_lo, a_hi = math.atan(SIGMA_MIN), math.atan(SIGMA_MAX)
    expected = [math.tan(a_hi + i / (steps - 1) * (a_lo - a_hi)) for i in range(steps)] + [0.0]
    assert_schedule(calculate_sigmas(SAMPLING, "kl_optimal", steps), expected, rtol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 6, 15])
def test_linear_quadratic_is_linear_to_the_threshold_then_quadratic_to_zero(steps: int) -> None:
    sigmas = linear_quadratic(SAMPLING, steps).double().numpy()
    assert len(sigmas) == steps + 1 and sigmas[-1] == 0
    assert sigmas[0] == pytest.approx(SIGMA_MAX)
    if steps < 4:  # too few points to pin the quadratic
        return
    linear_steps = steps // 2
    fraction = 1 - sigmas / SIGMA_MAX  # the mochi schedule, from 0 up to 1
    numpy.testing.assert_allclose(
        fraction[:linear_steps], [0.025 * i / linear_steps for i in range(linear_steps)], atol=1e-6
    )
    quadratic = numpy.polyfit(numpy.arange(linear_steps, steps + 1), fraction[linear_steps:], 2)
    assert numpy.polyval(quadratic, linear_steps) == pytest.approx(0.025, abs=1e-5)
    assert numpy.polyval(quadratic, steps) == pytest.approx(1.0, abs=1e-5)


def test_beta_quantile_matches_closed_forms() -> None:
    for q in (0.01, 0.3, 0.5, 0.77, 0.99):
        assert beta_ppf(q, 1.0, 1.0) == pytest.approx(q, abs=1e-15)
        assert beta_ppf(q, 2.0, 1.0) == pytest.approx(math.sqrt(q), abs=1e-15)
        assert beta_ppf(q, 1.0, 2.0) == pytest.approx(1 - math.sqrt(1 - q), abs=1e-15)
        assert beta_cdf(beta_ppf(q, 0.6, 0.6), 0.6, 0.6) == pytest.approx(q, abs=1e-15)
    assert beta_ppf(0.5, 0.6, 0.6) == 0.5


@pytest.mark.parametrize("steps", [1, 2, 5, 20, 41])
def test_beta_takes_table_sigmas_at_beta_quantiles_without_repeats(steps: int) -> None:
    uniform = beta(SAMPLING, steps, alpha=1.0, beta=1.0)
    timesteps = numpy.rint(999 * (1 - numpy.arange(steps) / steps))
    assert_schedule(uniform, [TABLE[int(t)] for t in timesteps] + [0.0], rtol=0)
    default = calculate_sigmas(SAMPLING, "beta", steps)
    assert default[0] == SAMPLING.sigma_max and default[-1] == 0
    assert bool((default[:-1] > default[1:]).all())


def test_beta_timesteps_agree_with_scipy_when_it_is_installed() -> None:
    stats = pytest.importorskip("scipy.stats")
    for steps in range(1, 70):
        quantiles = 1 - numpy.linspace(0, 1, steps, endpoint=False)
        reference = numpy.rint(stats.beta.ppf(quantiles, 0.6, 0.6) * 999)
        ours = numpy.rint(numpy.array([beta_ppf(float(q), 0.6, 0.6) for q in quantiles]) * 999)
        assert numpy.array_equal(ours, reference), steps


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("steps", [2, 3, 8, 30])
def test_every_schedule_descends_from_sigma_max_to_zero(name: str, steps: int) -> None:
    sigmas = calculate_sigmas(SAMPLING, name, steps)
    assert sigmas[-1] == 0 and bool((sigmas[:-1] > sigmas[1:]).all())
    if name == "ddim_uniform":  # DDIM's grid 1, 1 + k, ... stops short of timestep 999
        assert float(sigmas[0]) <= SIGMA_MAX
    else:
        assert float(sigmas[0]) == pytest.approx(SIGMA_MAX, rel=1e-5)
    if name not in ("ddim_uniform", "beta"):  # those pick table entries and may differ by one
        assert len(sigmas) == steps + 1


def test_sd_turbo_uses_every_hundredth_timestep_from_999() -> None:
    assert_schedule(sd_turbo(SAMPLING, 4, 1.0), [sigma_at(t) for t in (999, 899, 799, 699)] + [0.0])
    assert_schedule(sd_turbo(SAMPLING, 2, 0.5), [sigma_at(t) for t in (499, 399)] + [0.0])


def test_sigmas_for_full_denoise_is_the_whole_schedule() -> None:
    full = calculate_sigmas(SAMPLING, "karras", 12)
    assert torch.equal(sigmas_for(SAMPLING, "karras", 12, 1.0), full)


def test_sigmas_for_partial_denoise_keeps_the_tail_of_a_longer_schedule() -> None:
    longer = calculate_sigmas(SAMPLING, "normal", int(10 / 0.45))  # 22 steps
    assert torch.equal(sigmas_for(SAMPLING, "normal", 10, 0.45), longer[-11:])
    assert sigmas_for(SAMPLING, "normal", 10, 0.0).numel() == 0


def test_sigmas_for_discards_the_penultimate_sigma_for_dpm_2_and_uni_pc() -> None:
    for sampler_name in ("dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"):
        longer = calculate_sigmas(SAMPLING, "karras", 11)
        expected = torch.cat([longer[:-2], longer[-1:]])
        assert torch.equal(sigmas_for(SAMPLING, "karras", 10, sampler_name=sampler_name), expected)
    assert len(sigmas_for(SAMPLING, "karras", 10, sampler_name="euler")) == 11


def test_unknown_scheduler_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown scheduler 'karas'.*simple, sgm_uniform, karras"):
        calculate_sigmas(SAMPLING, "karas", 10)


def test_scheduler_names_follow_comfyui_order() -> None:
    assert SCHEDULER_NAMES == (
        "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
        "linear_quadratic", "kl_optimal",
    )  # fmt: skip


def test_step_range_cuts_the_schedule_for_ksampler_advanced() -> None:
    sigmas = calculate_sigmas(SAMPLING, "karras", 10)
    base = step_range(sigmas, 0, 6, force_full_denoise=False)
    assert torch.equal(base, sigmas[:7]) and base[-1] > 0  # hands leftover noise on
    refiner = step_range(sigmas, 6, 10000, force_full_denoise=True)
    assert torch.equal(refiner, sigmas[6:]) and refiner[-1] == 0
    finished = step_range(sigmas, 0, 6, force_full_denoise=True)
    assert finished[-1] == 0 and torch.equal(finished[:-1], sigmas[:6])
    assert sigmas[6] > 0  # the input schedule is left alone
    assert step_range(sigmas, 10, None, force_full_denoise=True) is None
