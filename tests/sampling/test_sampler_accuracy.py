"""Convergence orders and output distributions on the Gaussian problem (tests/sampling)."""

from __future__ import annotations

import math
import warnings

import numpy
import pytest
import torch

from engine.diffusion.sampling import (
    SamplerOptions,
    SeededNoise,
    get_sampler,
    initial_noise,
    karras,
    model_sampling,
    sigmas_for,
)
from tests.sampling import (
    MU,
    S,
    exact_denoiser,
    exact_endpoint,
    ode_options,
    skip_without_torchsde,
    start_latent,
)

SIGMA_MIN, SIGMA_MAX = 0.0291675, 14.614642

# sampler: (expected global order, tolerance, step counts). Samplers with noise run at their
# probability-flow ODE limit (eta 0). DPM-Solver++(3M) and LMS warm up with lower orders; on
# this problem (where the x0 estimate changes fastest near sigma_max in log-sigma) 3M settles
# at 2, and LMS only slowly approaches its order 4. UniPC-3 gains one order from its
# corrector. dpm_fast uses step counts where its last step is second order (nfe % 3 == 2).
# The CFG++ samplers run on a model without guidance, where they reduce to their base
# method. Gradient estimation's extrapolated direction keeps Euler's first order; ER-SDE's
# third stage and SA-Solver's order-3 predictor with order-4 corrector settle near 2 and 3.
ORDERS: dict[str, tuple[float, float, tuple[int, ...]]] = {
    "euler": (1, 0.15, (16, 32, 64)),
    "euler_cfg_pp": (1, 0.15, (16, 32, 64)),
    "euler_ancestral_cfg_pp": (1, 0.15, (16, 32, 64)),
    "gradient_estimation": (1, 0.2, (16, 32, 64)),
    "gradient_estimation_cfg_pp": (1, 0.2, (16, 32, 64)),
    "exp_heun_2_x0": (2, 0.25, (16, 32, 64)),
    "exp_heun_2_x0_sde": (2, 0.25, (16, 32, 64)),
    "dpmpp_2m_cfg_pp": (2, 0.25, (16, 32, 64)),
    "dpmpp_2m_sde_heun": (2, 0.25, (16, 32, 64)),
    "res_multistep": (2, 0.25, (16, 32, 64)),
    "res_multistep_cfg_pp": (2, 0.25, (16, 32, 64)),
    "res_multistep_ancestral": (2, 0.25, (16, 32, 64)),
    "res_multistep_ancestral_cfg_pp": (2, 0.25, (16, 32, 64)),
    "er_sde": (2, 0.25, (16, 32, 64)),
    "seeds_2": (2, 0.25, (16, 32, 64)),
    "seeds_3": (3, 0.3, (16, 32, 64)),
    "sa_solver": (3, 0.45, (16, 32, 64)),
    "ddim": (1, 0.15, (16, 32, 64)),
    "euler_ancestral": (1, 0.15, (16, 32, 64)),
    "heunpp2": (1, 0.15, (16, 32, 64)),
    "heun": (2, 0.25, (16, 32, 64)),
    "dpm_2": (2, 0.25, (16, 32, 64)),
    "dpm_2_ancestral": (2, 0.25, (16, 32, 64)),
    "dpmpp_2m": (2, 0.25, (16, 32, 64)),
    "dpmpp_2s_ancestral": (2, 0.25, (16, 32, 64)),
    "dpmpp_sde": (2, 0.25, (16, 32, 64)),
    "dpmpp_2m_sde": (2, 0.25, (16, 32, 64)),
    "dpmpp_3m_sde": (2, 0.3, (64, 128, 256)),
    "ipndm": (2, 0.3, (16, 32, 64)),
    "deis": (3, 0.3, (16, 32, 64)),
    "dpm_fast": (3, 0.45, (11, 23, 47)),
    "lms": (4, 0.45, (32, 64, 128)),
    "uni_pc": (4, 0.4, (16, 32, 64)),
    "uni_pc_bh2": (4, 0.4, (16, 32, 64)),
}


def sample(name: str, x: torch.Tensor, sigmas: torch.Tensor, seed: int = 0, **options: object):
    skip_without_torchsde(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchsde's float32 boundary warnings
        return get_sampler(name)(
            exact_denoiser, x, sigmas, extra_args={}, callback=None,
            noise=SeededNoise(seed), options=SamplerOptions(**options),
        )  # fmt: skip


def error_at(name: str, steps: int, **options: object) -> float:
    """Max deviation from the exact endpoint on Karras sigmas over SD's sigma range."""
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    sigmas = karras(steps, SIGMA_MIN, SIGMA_MAX)
    x = start_latent(z, float(sigmas[0]))
    out = sample(name, x, sigmas, **{**ode_options(name), **options})
    return float((out.double() - exact_endpoint(name, x, sigmas)).abs().max())


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_deterministic_samplers_converge_at_their_order(name: str) -> None:
    expected, tolerance, step_counts = ORDERS[name]
    errors = [error_at(name, steps) for steps in step_counts]
    slope = numpy.polyfit(numpy.log(step_counts), numpy.log(errors), 1)[0]
    assert abs(-slope - expected) <= tolerance, (errors, -slope)


def test_ipndm_v_converges_though_its_variable_step_weights_are_irregular() -> None:
    errors = [error_at("ipndm_v", steps) for steps in (8, 32, 128)]
    assert errors[2] < errors[1] < errors[0] and errors[2] < errors[0] / 20


def test_sa_solver_pece_is_more_accurate_than_sa_solver_for_the_same_steps() -> None:
    """PECE re-evaluates the corrected state: one more model call per step, less error."""
    for steps in (8, 16):
        assert error_at("sa_solver_pece", steps) < error_at("sa_solver", steps) / 1.5
    assert error_at("sa_solver_pece", 32) < 2e-4


def test_dpmpp_2s_ancestral_cfg_pp_drifts_off_the_ode_as_comfyui_0_8s_does() -> None:
    """ComfyUI 0.8 takes the full step's guidance from the midpoint's uncond, so even without
    guidance each step adds D(x) - D(x_mid); the error does not shrink with more steps."""
    errors = [error_at("dpmpp_2s_ancestral_cfg_pp", steps) for steps in (16, 32, 64)]
    assert min(errors) > 0.3 and errors[2] > errors[0]


def test_dpm_adaptive_meets_a_tighter_tolerance_with_more_evaluations() -> None:
    loose = error_at("dpm_adaptive", 20)
    tight = error_at("dpm_adaptive", 20, rtol=1e-4, atol=1e-5)
    assert tight < 3e-3 and tight < loose / 20


STOCHASTIC = (
    "euler_ancestral", "euler_ancestral_cfg_pp", "dpm_2_ancestral", "dpmpp_2s_ancestral",
    "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "ddpm",
    "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "exp_heun_2_x0_sde", "er_sde",
    "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece",
)  # fmt: skip


def final_std(sigma_last: float) -> float:
    """The std of the final denoise D(x, sigma_last) when x has the exact marginal there."""
    return S * S / math.sqrt(S * S + sigma_last * sigma_last)


# Euler-ancestral (and DDPM, the same update) loses variance at first order in the step size.
FIRST_ORDER_STEPS = {"euler_ancestral": 300, "euler_ancestral_cfg_pp": 300, "ddpm": 300}


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_produce_the_data_distribution(name: str) -> None:
    z = torch.randn(1, 10000, generator=torch.Generator().manual_seed(11))
    sigmas = karras(FIRST_ORDER_STEPS.get(name, 100), SIGMA_MIN, SIGMA_MAX)
    out = sample(name, start_latent(z, float(sigmas[0])), sigmas, seed=3)
    assert float(out.mean()) == pytest.approx(MU, abs=0.02)
    assert float(out.std()) == pytest.approx(final_std(SIGMA_MIN), rel=0.03)


def test_euler_ancestral_variance_error_shrinks_with_the_step_size() -> None:
    z = torch.randn(1, 10000, generator=torch.Generator().manual_seed(11))

    def relative_std_error(steps: int) -> float:
        sigmas = karras(steps, SIGMA_MIN, SIGMA_MAX)
        out = sample("euler_ancestral", start_latent(z, float(sigmas[0])), sigmas, seed=3)
        return abs(float(out.std()) / final_std(SIGMA_MIN) - 1)

    assert relative_std_error(300) < relative_std_error(100) / 2


def test_lcm_re_noises_the_x0_estimate_each_step() -> None:
    """With the exact (mean) denoiser the variance follows V' = c^2 V + sigma_next^2."""
    z = torch.randn(1, 20000, generator=torch.Generator().manual_seed(12))
    sigmas = karras(6, SIGMA_MIN, SIGMA_MAX)
    out = sample("lcm", start_latent(z, float(sigmas[0])), sigmas, seed=1)
    variance = S * S + float(sigmas[0]) ** 2
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        variance = (S * S / (S * S + sigma * sigma)) ** 2 * variance + sigma_next**2
    assert float(out.mean()) == pytest.approx(MU, abs=0.02)
    assert float(out.std()) == pytest.approx(math.sqrt(variance), rel=0.03)


def test_sde_samplers_barely_depend_on_the_step_count_unlike_ancestral_ones() -> None:
    """Brownian-tree noise: the same seed gives nearly the same sample at 50 and 100 steps."""
    z = torch.randn(1, 4000, generator=torch.Generator().manual_seed(13))

    def correlation(name: str) -> float:
        outs = []
        for steps in (50, 100):
            sigmas = karras(steps, SIGMA_MIN, SIGMA_MAX)
            outs.append(sample(name, start_latent(z, float(sigmas[0])), sigmas, seed=4))
        return float(torch.corrcoef(torch.cat(outs))[0, 1])

    assert correlation("dpmpp_2m_sde") > 0.99
    assert correlation("euler_ancestral") < 0.6


def test_img2img_from_data_plus_noise_keeps_the_data_distribution() -> None:
    """KSampler with denoise 0.5: latent + sigma_0 * noise, then the tail of the schedule."""
    sampling = model_sampling()
    latent = MU + S * torch.randn(1, 4, 50, 50, generator=torch.Generator().manual_seed(14))
    sigmas = sigmas_for(sampling, "karras", 30, 0.5)
    assert not sampling.is_max_denoise(float(sigmas[0]))
    noise = initial_noise(latent, 77)
    x = sampling.noise_scaling(sigmas[0], noise, latent, False)
    for name in ("dpmpp_2s_ancestral", "dpmpp_2m_sde"):
        out = sample(name, x, sigmas, seed=77)
        assert float(out.mean()) == pytest.approx(MU, abs=0.02)
        assert float(out.std()) == pytest.approx(final_std(float(sigmas[-2])), rel=0.03)
    deterministic = sample("dpmpp_2m", x, sigmas).double()
    assert float((deterministic - exact_endpoint("dpmpp_2m", x, sigmas)).abs().max()) < 0.05
