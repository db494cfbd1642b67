"""A sampling problem with a known answer: data ~ N(MU, S^2) independently per element.

Its exact denoiser is D(x, sigma) = (S^2 x + sigma^2 MU) / (S^2 + sigma^2), and the
probability-flow ODE dx/dsigma = (x - D) / sigma has the closed-form solution
x(sigma) = MU + (x_T - MU) * sqrt(S^2 + sigma^2) / sqrt(S^2 + sigma_T^2).
"""

from __future__ import annotations

import math

import pytest
import torch

MU, S = 0.3, 0.8

# Where each deterministic sampler's last move ends: a full denoise (sigma 0) for most,
# UniPC's substitute final sigma, and "no final move" for DPM-Solver fast/adaptive.
FINAL_SIGMA = {"uni_pc": 0.001, "uni_pc_bh2": 0.001}
NO_FINAL_MOVE = ("dpm_fast", "dpm_adaptive")


def exact_denoiser(x: torch.Tensor, sigma: torch.Tensor, **extra: object) -> torch.Tensor:
    sigma = sigma.view(-1, *([1] * (x.ndim - 1)))
    return (S * S * x + sigma * sigma * MU) / (S * S + sigma * sigma)


def ode_solution(x_t: torch.Tensor, sigma_t: float, sigma: float) -> torch.Tensor:
    """x(sigma) on the probability-flow ODE through x_t at sigma_t (float64)."""
    return MU + (x_t.double() - MU) * math.sqrt(S * S + sigma * sigma) / math.sqrt(
        S * S + sigma_t * sigma_t
    )


def start_latent(z: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """A draw from the exact marginal at sigma_max: MU + sqrt(S^2 + sigma_max^2) * z."""
    return MU + math.sqrt(S * S + sigma_max * sigma_max) * z


def exact_endpoint(sampler_name: str, x_t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The exact ODE solution down to the last non-zero sigma, then the sampler's own last move.

    That move is a DDIM step from sigma_last to sigma_end with the exact x0 estimate:
    (sigma_end / sigma_last) x + (1 - sigma_end / sigma_last) D(x, sigma_last). With
    sigma_end = 0 it is the final denoise most samplers do.
    """
    sigma_t, sigma_last = float(sigmas[0]), float(sigmas[-2] if sigmas[-1] == 0 else sigmas[-1])
    x_last = ode_solution(x_t, sigma_t, sigma_last)
    if sampler_name in NO_FINAL_MOVE or sigmas[-1] != 0:
        return x_last
    ratio = FINAL_SIGMA.get(sampler_name, 0.0) / sigma_last
    denoised = exact_denoiser(x_last, torch.tensor([sigma_last], dtype=torch.float64))
    return ratio * x_last + (1 - ratio) * denoised


def ode_options(sampler_name: str) -> dict[str, object]:
    """Options that switch a sampler's noise off (its probability-flow ODE limit): eta 0, and
    for er_sde, whose default noise scale ignores eta, the "ODE" solver type."""
    return {"solver_type": "ODE"} if sampler_name == "er_sde" else {"eta": 0.0}


def skip_without_torchsde(sampler_name: str) -> None:
    """The SDE samplers need torchsde for their Brownian-tree noise."""
    if "_sde" in sampler_name:
        pytest.importorskip("torchsde")
