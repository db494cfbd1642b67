"""The schedules of the custom scheduler nodes: VP, Laplace, and the published tables of
Align Your Steps, GITS and OptimalSteps stretched to any step count (tables are facts; the
stretching is checked against log-linear interpolation written out here)."""

from __future__ import annotations

import math

import numpy
import pytest
import torch

from engine.diffusion.sampling import laplace, model_sampling, vp
from engine.diffusion.sampling.schedulers import beta
from engine.diffusion.sampling.tuned_schedules import (
    ALIGN_YOUR_STEPS,
    GITS_COEFFS,
    OPTIMAL_STEPS,
    align_your_steps,
    gits,
    gits_noise_levels,
    optimal_steps,
)


def stretched(table: tuple[float, ...], steps: int) -> list[float]:
    """steps + 1 sigmas whose log is piecewise linear between evenly placed table entries."""
    out = []
    for k in range(steps + 1):
        position = k / steps * (len(table) - 1)
        j = min(int(position), len(table) - 2)
        weight = position - j
        out.append(math.exp((1 - weight) * math.log(table[j]) + weight * math.log(table[j + 1])))
    return out


def assert_close(actual: torch.Tensor, expected: list[float]) -> None:
    assert actual.dtype == torch.float32 and actual.shape == (len(expected),)
    numpy.testing.assert_allclose(actual.double().numpy(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("steps", [1, 4, 20])
def test_vp_is_the_continuous_vp_sde_from_t_1_to_eps(steps: int) -> None:
    times = numpy.linspace(1, 1e-3, steps)
    expected = [math.sqrt(math.expm1(19.9 * t * t / 2 + 0.1 * t)) for t in times] + [0.0]
    assert_close(vp(steps), expected)


@pytest.mark.parametrize(("mu", "scale"), [(0.0, 0.5), (0.5, 1.0)])
def test_laplace_puts_log_sigma_at_laplace_quantiles_without_a_final_zero(mu: float,
                                                                           scale: float) -> None:
    expected = []
    for u in numpy.linspace(0, 1, 12):
        log_sigma = mu - scale * numpy.sign(0.5 - u) * math.log(1 - 2 * abs(0.5 - u) + 1e-5)
        expected.append(min(max(math.exp(log_sigma), 0.0291675), 14.614642))
    assert_close(laplace(12, 0.0291675, 14.614642, mu, scale), expected)


def test_align_your_steps_gives_the_published_ten_steps() -> None:
    for model_type, table in ALIGN_YOUR_STEPS.items():
        assert_close(align_your_steps(model_type, 10), list(table[:-1]) + [0.0])


@pytest.mark.parametrize("steps", [4, 15, 32])
def test_align_your_steps_stretches_in_log_sigma(steps: int) -> None:
    expected = stretched(ALIGN_YOUR_STEPS["SDXL"], steps)
    assert_close(align_your_steps("SDXL", steps), expected[:-1] + [0.0])


def test_denoise_keeps_the_last_steps_of_a_tuned_schedule() -> None:
    full = align_your_steps("SD1", 20)
    half = align_your_steps("SD1", 20, 0.5)
    assert torch.equal(half, torch.cat([full[10:-1], full.new_zeros(1)]))
    assert align_your_steps("SD1", 20, 0.0).numel() == 0
    assert torch.equal(gits(1.2, 10, 0.3)[:-1], gits(1.2, 10)[-4:-1])


def test_gits_gives_the_published_schedule_for_its_coefficient_and_step_count() -> None:
    # GITS's 5-step schedule for coefficient 1.00 (its published table)
    published = [14.61464119, 7.11996698, 3.07277966, 1.56271636, 0.59516323, 0.02916753]
    assert_close(gits(1.0, 5), published[:-1] + [0.0])
    table = gits_noise_levels()
    assert sorted(table) == list(GITS_COEFFS)
    for rows in table.values():
        assert [len(row) for row in rows] == list(range(3, 22))


def test_gits_stretches_its_twenty_step_schedule_beyond_twenty() -> None:
    twenty = gits_noise_levels()[1.2][-1]
    assert_close(gits(1.2, 33), stretched(twenty, 33)[:-1] + [0.0])


def test_gits_rejects_a_coefficient_it_has_no_table_for() -> None:
    with pytest.raises(ValueError, match="coeff 0.83 has no published schedule"):
        gits(0.83, 10)


def test_optimal_steps_stretches_the_flow_models_tables() -> None:
    assert_close(optimal_steps("FLUX", 10), list(OPTIMAL_STEPS["FLUX"][:-1]) + [0.0])
    assert_close(optimal_steps("Wan", 7), stretched(OPTIMAL_STEPS["Wan"], 7)[:-1] + [0.0])


def test_beta_scheduler_needs_positive_shape_parameters() -> None:
    with pytest.raises(ValueError, match="alpha and beta above 0, got alpha=0.0"):
        beta(model_sampling(), 10, alpha=0.0, beta=0.6)
