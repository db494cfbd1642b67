"""The discrete LDM schedule, sigma <-> timestep maps and the denoiser parameterisations."""

from __future__ import annotations

import math

import numpy
import pytest
import torch

from engine.diffusion.networks.model_sampling import ZSNR_LAST_ALPHAS_CUMPROD
from engine.diffusion.sampling import Denoiser, model_sampling


def reference_sigmas() -> numpy.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t) from scaled-linear betas, in float64 numpy."""
    betas = numpy.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=numpy.float64) ** 2
    alphas_cumprod = numpy.cumprod(1.0 - betas)
    return numpy.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def test_sigma_table_is_the_scaled_linear_schedule_stored_in_float32() -> None:
    sampling = model_sampling()
    assert sampling.sigmas.dtype == torch.float32 and sampling.sigmas.shape == (1000,)
    expected = torch.from_numpy(reference_sigmas()).float()
    assert torch.allclose(sampling.sigmas, expected, rtol=1e-6, atol=0)
    expected_log = torch.from_numpy(numpy.log(reference_sigmas())).float()
    assert torch.allclose(sampling.log_sigmas, expected_log)


def test_sigma_range_matches_the_numbers_users_know() -> None:
    sampling = model_sampling()
    assert float(sampling.sigma_min) == pytest.approx(0.0291675, abs=1e-6)
    assert float(sampling.sigma_max) == pytest.approx(14.614642, abs=1e-5)


def test_timestep_of_each_table_sigma_is_its_index() -> None:
    sampling = model_sampling()
    assert torch.equal(sampling.timestep(sampling.sigmas), torch.arange(1000))
    assert int(sampling.timestep(sampling.sigma_max)) == 999
    assert int(sampling.timestep(torch.tensor(1e-4))) == 0
    assert int(sampling.timestep(torch.tensor(1e4))) == 999


def test_timestep_picks_the_nearest_entry_in_log_sigma() -> None:
    sampling = model_sampling()
    low, high = sampling.sigmas[500], sampling.sigmas[501]
    just_below_middle = (0.49 * low.log() + 0.51 * high.log()).exp()
    just_above_middle = (0.51 * low.log() + 0.49 * high.log()).exp()
    assert int(sampling.timestep(just_below_middle)) == 501
    assert int(sampling.timestep(just_above_middle)) == 500


def test_sigma_interpolates_log_sigma_between_timesteps() -> None:
    sampling = model_sampling()
    # exp(log(sigma)) in float32: equal to the table up to rounding
    assert torch.allclose(sampling.sigma(torch.arange(1000)), sampling.sigmas, rtol=1e-6, atol=0)
    log_sigmas = sampling.log_sigmas
    expected = math.exp(0.25 * float(log_sigmas[10]) + 0.75 * float(log_sigmas[11]))
    assert float(sampling.sigma(torch.tensor(10.75))) == pytest.approx(expected, rel=1e-6)
    assert torch.equal(sampling.sigma(torch.tensor(-5.0)), sampling.sigma(torch.tensor(0.0)))
    assert torch.equal(sampling.sigma(torch.tensor(2000.0)), sampling.sigma(torch.tensor(999.0)))


def test_percent_to_sigma_runs_from_above_sigma_max_to_zero() -> None:
    sampling = model_sampling()
    assert sampling.percent_to_sigma(0.0) == 999999999.9
    assert sampling.percent_to_sigma(1.0) == 0.0
    halfway = float(sampling.sigma(torch.tensor(499.5)))
    assert sampling.percent_to_sigma(0.5) == pytest.approx(halfway)


def test_zero_terminal_snr_rescale_keeps_the_first_sigma_and_pins_the_last() -> None:
    plain, rescaled = model_sampling(), model_sampling(zsnr=True)
    expected_last = math.sqrt((1 - ZSNR_LAST_ALPHAS_CUMPROD) / ZSNR_LAST_ALPHAS_CUMPROD)
    assert float(rescaled.sigma_max) == pytest.approx(expected_last, rel=1e-6)
    assert float(rescaled.sigma_min) == pytest.approx(float(plain.sigma_min), rel=1e-5)
    alphas_bar_sqrt = 1 / numpy.sqrt(reference_sigmas() ** 2 + 1)
    shifted = alphas_bar_sqrt - alphas_bar_sqrt[-1]
    shifted *= alphas_bar_sqrt[0] / shifted[0]
    expected = numpy.sqrt((1 - shifted[500] ** 2) / shifted[500] ** 2)
    assert float(rescaled.sigmas[500]) == pytest.approx(expected, rel=1e-6)


def test_lcm_table_keeps_the_fifty_distilled_timesteps() -> None:
    plain, lcm = model_sampling(), model_sampling("lcm")
    assert torch.equal(lcm.sigmas, plain.sigmas[19::20])
    assert int(lcm.timestep(lcm.sigma_max)) == 999
    assert int(lcm.timestep(lcm.sigma_min)) == 19
    assert float(lcm.sigma(torch.tensor(999))) == pytest.approx(float(plain.sigmas[999]), rel=1e-6)
    assert float(lcm.sigma(torch.tensor(519))) == pytest.approx(float(plain.sigmas[519]), rel=1e-6)


def test_unknown_prediction_type_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="'epsilon' is not one of eps, v_prediction"):
        model_sampling("epsilon")


def recording_network(output: torch.Tensor) -> tuple[list, object]:
    calls: list = []

    def network(x_in: torch.Tensor, timestep: torch.Tensor, **cond: object) -> torch.Tensor:
        calls.append((x_in, timestep, cond))
        return output

    return calls, network


def test_eps_denoiser_scales_the_input_and_subtracts_sigma_times_eps() -> None:
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    sampling = model_sampling("eps")
    calls, network = recording_network(eps)
    sigma = torch.tensor([14.614642, 1.0])
    denoised = Denoiser(network, sampling)(x, sigma, context="text")
    x_in, timestep, cond = calls[0]
    assert torch.allclose(x_in, x / torch.sqrt(sigma**2 + 1).view(2, 1, 1, 1))
    assert timestep.dtype == torch.float32
    assert timestep.tolist() == [999.0, float(sampling.timestep(torch.tensor(1.0)))]
    assert cond == {"context": "text"}
    assert torch.allclose(denoised, x - eps * sigma.view(2, 1, 1, 1))


def test_v_prediction_denoiser_recovers_x0_from_the_true_velocity() -> None:
    generator = torch.Generator().manual_seed(2)
    x0 = torch.randn(1, 4, 3, 3, generator=generator)
    eps = torch.randn(1, 4, 3, 3, generator=generator)
    sigma = torch.tensor([2.5])
    alpha, sigma_vp = 1 / math.sqrt(1 + 2.5**2), 2.5 / math.sqrt(1 + 2.5**2)
    velocity = alpha * eps - sigma_vp * x0
    _, network = recording_network(velocity)
    denoised = Denoiser(network, model_sampling("v_prediction"))(x0 + 2.5 * eps, sigma)
    assert torch.allclose(denoised, x0, atol=1e-5)


def test_x0_prediction_returns_the_network_output_and_img_to_img_skips_c_in() -> None:
    x, output = torch.ones(1, 4, 2, 2) * 3, torch.full((1, 4, 2, 2), 0.5)
    calls, network = recording_network(output)
    assert torch.equal(Denoiser(network, model_sampling("x0"))(x, torch.tensor([3.0])), output)
    assert torch.allclose(calls[0][0], x / math.sqrt(10))
    Denoiser(network, model_sampling("img_to_img"))(x, torch.tensor([3.0]))
    assert torch.equal(calls[1][0], x)


def test_lcm_denoiser_applies_the_consistency_boundary_scalings() -> None:
    sampling = model_sampling("lcm")
    x, eps = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), 0.5)
    sigma = sampling.sigmas[10:11]  # timestep 10 * 20 + 19 = 219
    _, network = recording_network(eps)
    scaled = 219 * 10.0
    c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / math.sqrt(scaled**2 + 0.25)
    expected = c_out * (2.0 - 0.5 * float(sigma)) + c_skip * 2.0
    assert float(Denoiser(network, sampling)(x, sigma)) == pytest.approx(expected, rel=1e-6)


def test_noise_scaling_forms_the_start_latent() -> None:
    sampling = model_sampling()
    noise, latent = torch.full((1, 4, 2, 2), 2.0), torch.full((1, 4, 2, 2), 1.0)
    sigma = torch.tensor(3.0)
    assert torch.allclose(sampling.noise_scaling(sigma, noise, latent), latent + 6.0)
    from_noise = sampling.noise_scaling(sigma, noise, latent, max_denoise=True)
    assert torch.allclose(from_noise, latent + 2.0 * math.sqrt(10.0))
    two_sigmas, two_noises = torch.tensor([1.0, 2.0]), noise.repeat(2, 1, 1, 1)
    per_sample = sampling.noise_scaling(two_sigmas, two_noises, 0 * noise)
    assert per_sample[:, 0, 0, 0].tolist() == [2.0, 4.0]
    assert torch.equal(sampling.inverse_noise_scaling(sigma, latent), latent)


def test_max_denoise_means_starting_at_sigma_max_within_a_relative_1e_5() -> None:
    sampling = model_sampling()
    sigma_max = float(sampling.sigma_max)
    assert sampling.is_max_denoise(sigma_max)
    assert sampling.is_max_denoise(sigma_max * (1 - 5e-6))
    assert sampling.is_max_denoise(sigma_max * 2)
    assert not sampling.is_max_denoise(sigma_max * 0.999)
