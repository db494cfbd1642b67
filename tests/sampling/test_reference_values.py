"""Same-seed agreement of the CFG++, RES, gradient-estimation, SEEDS, ER-SDE and SA-Solver
samplers with reference values computed here, in float64, from their published equations.

The model is a guided pair of exact Gaussian denoisers (tests/sampling): D_c for the prompt,
D_u for the negative, D = D_u + cfg (D_c - D_u). Noise is the per-step stream of the seed
(a CPU generator seeded with seed + 1), drawn in the order each method states.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy
import pytest
import torch
from torch import Tensor

from engine.diffusion.sampling import (
    SamplerOptions,
    SeededNoise,
    denoise_with_uncond,
    get_sampler,
)
from tests.sampling import exact_denoiser

CFG, SEED = 1.6, 9
SIGMAS = torch.tensor([6.0, 2.5, 1.1, 0.45, 0.16, 0.0])


def uncond_denoiser(x: Tensor, sigma: Tensor) -> Tensor:
    """The exact denoiser of N(-0.2, 0.6^2) data: a different 'prompt'."""
    sigma = sigma.view(-1, *([1] * (x.ndim - 1)))
    return (0.36 * x + sigma * sigma * -0.2) / (0.36 + sigma * sigma)


class Guided:
    """D = D_u + cfg (D_c - D_u) with D_u on request, as the guider hands them out."""

    def __call__(self, x: Tensor, sigma: Tensor, **extra: object) -> Tensor:
        return self.with_uncond(x, sigma)[0]

    def with_uncond(self, x: Tensor, sigma: Tensor, **extra: object) -> tuple[Tensor, Tensor]:
        cond, uncond = exact_denoiser(x, sigma), uncond_denoiser(x, sigma)
        return uncond + CFG * (cond - uncond), uncond


def pair(x: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    """(D, D_u) in float64 at a scalar sigma."""
    return Guided().with_uncond(x, torch.tensor([sigma], dtype=torch.float64))


def start() -> Tensor:
    return torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5)) * 6.0


def stream(shape: torch.Size) -> Callable[[], Tensor]:
    generator = torch.Generator().manual_seed(SEED + 1)
    return lambda: torch.randn(shape, generator=generator).double()


def sample(name: str, **options: object) -> Tensor:
    return get_sampler(name)(Guided(), start(), SIGMAS, extra_args={}, callback=None,
                             noise=SeededNoise(SEED), options=SamplerOptions(**options))


def ancestral(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up): the DDPM posterior's noise share of a step, scaled by eta."""
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def steps() -> list[tuple[int, float, float]]:
    values = SIGMAS.double().tolist()
    return [(i, values[i], values[i + 1]) for i in range(len(values) - 1)]


def assert_agrees(ours: Tensor, reference: Tensor) -> None:
    assert torch.allclose(ours.double(), reference, rtol=1e-4, atol=1e-4), \
        float((ours.double() - reference).abs().max())


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_euler_cfg_pp_steps_along_the_uncond_noise(eta: float) -> None:
    """x' = D + sigma_down (x - D_u) / sigma + sigma_up z  (CFG++, Chung et al. 2024)."""
    x, draw = start().double(), stream(start().shape)
    for _, sigma, sigma_next in steps():
        denoised, uncond = pair(x, sigma)
        if sigma_next == 0:
            x = denoised
            continue
        down, up = ancestral(sigma, sigma_next, eta)
        x = denoised + down * (x - uncond) / sigma
        if eta > 0:
            x = x + up * draw()
    name = "euler_ancestral_cfg_pp" if eta else "euler_cfg_pp"
    assert_agrees(sample(name, eta=eta) if eta else sample(name), x)


def test_dpmpp_2m_cfg_pp_corrects_with_the_previous_uncond() -> None:
    """x' = D + e^-h (x - D_u) + (1 - e^-h) / (2 r) (D - D_u,prev), r = h_prev / h."""
    x, h_prev, uncond_prev = start().double(), None, None
    for _, sigma, sigma_next in steps():
        denoised, uncond = pair(x, sigma)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        x_next = denoised + math.exp(-h) * (x - uncond)
        if uncond_prev is not None:
            x_next = x_next + (1 - math.exp(-h)) / (2 * h_prev / h) * (denoised - uncond_prev)
        x, h_prev, uncond_prev = x_next, h, uncond
    assert_agrees(sample("dpmpp_2m_cfg_pp"), x)


def test_dpmpp_2s_ancestral_cfg_pp_takes_the_midpoint_uncond_for_the_full_step() -> None:
    """ComfyUI 0.8: both stages from x + (D - D_u); the full step with the midpoint's D_u."""
    x, draw = start().double(), stream(start().shape)
    for _, sigma, sigma_next in steps():
        denoised, uncond = pair(x, sigma)
        down, up = ancestral(sigma, sigma_next, 1.0)
        if down == 0:
            x = denoised
        else:
            middle = math.sqrt(sigma * down)  # halfway in log(sigma)
            x_2 = middle / sigma * (x + denoised - uncond) + (1 - middle / sigma) * denoised
            denoised_2, uncond_2 = pair(x_2, middle)
            x = down / sigma * (x + denoised - uncond_2) + (1 - down / sigma) * denoised_2
        if sigma_next > 0:
            x = x + up * draw()
    assert_agrees(sample("dpmpp_2s_ancestral_cfg_pp"), x)


def phi_1(t: float) -> float:
    return math.expm1(t) / t


def phi_2(t: float) -> float:
    return (phi_1(t) - 1) / t


@pytest.mark.parametrize(("name", "eta", "cfg_pp"), [
    ("res_multistep", 0.0, False), ("res_multistep_cfg_pp", 0.0, True),
    ("res_multistep_ancestral", 1.0, False), ("res_multistep_ancestral_cfg_pp", 1.0, True)])
def test_res_multistep_matches_its_second_order_weights(name: str, eta: float,
                                                        cfg_pp: bool) -> None:
    """RES (arXiv 2308.02157): x' = e^-h x + h (b1 D + b2 D_prev), b2 = phi_2(-h) / c2,
    b1 = phi_1(-h) - b2, c2 = (lambda_prev - lambda_old_down) / h; Euler first and last."""
    x, draw = start().double(), stream(start().shape)
    previous: tuple[Tensor, float] | None = None
    values = SIGMAS.double().tolist()
    for i, sigma, sigma_next in steps():
        denoised, uncond = pair(x, sigma)
        estimate = uncond if cfg_pp else denoised
        down, up = ancestral(sigma, sigma_next, eta) if eta else (sigma_next, 0.0)
        if down == 0 or previous is None:
            x = denoised + (x - uncond) / sigma * down if cfg_pp \
                else x + (x - denoised) / sigma * (down - sigma)
        else:
            h = math.log(sigma / down)
            c2 = (math.log(previous[1]) - math.log(values[i - 1])) / h
            b2 = phi_2(-h) / c2
            b1 = phi_1(-h) - b2
            if cfg_pp:
                x = x + denoised - uncond
            x = math.exp(-h) * x + h * (b1 * estimate + b2 * previous[0])
        if sigma_next > 0:
            x = x + up * draw()
        previous = (estimate, down)
    assert_agrees(sample(name), x)


@pytest.mark.parametrize("cfg_pp", [False, True])
def test_gradient_estimation_extrapolates_the_direction(cfg_pp: bool) -> None:
    """x' = x + (d + (gamma - 1)(d - d_prev)) (sigma' - sigma), gamma 2; the last step is D."""
    x, d_prev = start().double(), None
    for _, sigma, sigma_next in steps():
        denoised, uncond = pair(x, sigma)
        d = (x - (uncond if cfg_pp else denoised)) / sigma
        if sigma_next == 0:
            x = denoised
            continue
        x = denoised + d * sigma_next if cfg_pp else x + d * (sigma_next - sigma)
        if d_prev is not None:
            x = x + (d - d_prev) * (sigma_next - sigma)
        d_prev = d
    assert_agrees(sample("gradient_estimation_cfg_pp" if cfg_pp else "gradient_estimation"), x)


def seeds_step(x: Tensor, denoised: Tensor, sigma: float, sigma_next: float, ratios: list[float],
               eta: float, draw: Callable[[], Tensor] | None, final: Callable[..., Tensor]
               ) -> Tensor:
    """One SEEDS step: stage k goes from sigma to sigma_k = sigma e^(-r_k h) by the stage
    formula `final(stage_index, h_k, estimates)`; the SDE noise carries over stage to stage."""
    h = math.log(sigma / sigma_next)
    estimates, noise, previous_ratio = [denoised], None, 0.0
    for k, ratio in enumerate(ratios + [1.0]):
        sigma_k = sigma * math.exp(-ratio * h)
        x_k = sigma_k / sigma * math.exp(-ratio * h * eta) * x + final(k, ratio * h, estimates)
        if draw is not None:
            segment = (previous_ratio - ratio) * h * eta
            fresh = math.sqrt(-math.expm1(2 * segment)) * draw()
            noise = fresh if noise is None else noise * math.exp(segment) + fresh
            x_k = x_k + noise * sigma_k
        previous_ratio = ratio
        if k == len(ratios):
            return x_k
        estimates.append(pair(x_k, sigma_k)[0])
    raise AssertionError("unreachable")


def run_seeds(ratios: list[float], eta: float, stage: Callable[..., Tensor]) -> Tensor:
    x, draw = start().double(), stream(start().shape)
    for _, sigma, sigma_next in steps():
        denoised = pair(x, sigma)[0]
        if sigma_next == 0:
            x = denoised
            continue
        x = seeds_step(x, denoised, sigma, sigma_next, ratios, eta, draw if eta else None,
                       lambda k, hk, est: stage(k, hk * (eta + 1), est))
    return x


def test_seeds_2_phi_1_averages_the_two_stages() -> None:
    """SEEDS-2: stage at r = 1/2 by (1 - e^-(r h_eta)) D, then (1 - e^-h_eta) times the
    r-weighted mean (1 - 1/(2r)) D + 1/(2r) D_2."""
    def stage(k: int, h_eta: float, est: list[Tensor]) -> Tensor:
        mean = est[0] if k == 0 else (1 - 1 / (2 * 0.5)) * est[0] + 1 / (2 * 0.5) * est[1]
        return -math.expm1(-h_eta) * mean

    assert_agrees(sample("seeds_2"), run_seeds([0.5], 1.0, stage))


@pytest.mark.parametrize("name", ["exp_heun_2_x0", "exp_heun_2_x0_sde"])
def test_exponential_heun_weights_with_phi_2(name: str) -> None:
    """r = 1: the second stage at sigma' itself; x' = decay x - (b1 D + b2 D_2) with
    b2 = h phi_2(-h_eta), b1 = (e^-h_eta - 1) - b2 (the exponential trapezoid)."""
    def stage(k: int, h_eta: float, est: list[Tensor]) -> Tensor:
        if k == 0:
            return -math.expm1(-h_eta) * est[0]
        b2 = (math.expm1(-h_eta) + h_eta) / -h_eta
        return -((math.expm1(-h_eta) - b2) * est[0] + b2 * est[1])

    eta = 1.0 if name.endswith("_sde") else 0.0
    assert_agrees(sample(name), run_seeds([1.0], eta, stage))


def test_seeds_3_uses_its_third_order_weights() -> None:
    """SEEDS-3, stages at 1/3 and 2/3: a3_2 = (r2 / r1) h phi_2, b3 = h phi_2 / r2."""
    def h_phi_2(t: float) -> float:
        return (math.expm1(t) - t) / t

    def stage(k: int, h_eta: float, est: list[Tensor]) -> Tensor:
        if k == 0:
            return -math.expm1(-h_eta) * est[0]
        if k == 1:
            a2 = 2 * h_phi_2(-h_eta)
            return -((math.expm1(-h_eta) - a2) * est[0] + a2 * est[1])
        b3 = h_phi_2(-h_eta) / (2 / 3)
        return -((math.expm1(-h_eta) - b3) * est[0] + b3 * est[2])

    assert_agrees(sample("seeds_3"), run_seeds([1 / 3, 2 / 3], 1.0, stage))


def er_sde_scale(lam: Tensor | float) -> Tensor:
    lam = torch.as_tensor(lam, dtype=torch.float64)
    return lam * ((lam**0.3).exp() + 10.0)


def test_er_sde_three_stages_and_its_noise() -> None:
    """ER-SDE-Solver-3 (arXiv 2309.06169) with f(l) = l (e^(l^0.3) + 10), l = sigma: stage
    integrals by the 200-point rectangle rule, noise sqrt(l_t^2 - l_s^2 r^2)."""
    x, draw = start().double(), stream(start().shape)
    estimates: list[Tensor] = []
    slopes: list[Tensor] = []
    values = SIGMAS.double().tolist()
    for i, sigma, sigma_next in steps():
        denoised = pair(x, sigma)[0]
        if sigma_next == 0:
            x = denoised
            break
        r = er_sde_scale(sigma_next) / er_sde_scale(sigma)
        x = r * x + (1 - r) * denoised
        if estimates:
            dt = sigma_next - sigma
            grid = sigma_next + torch.arange(200, dtype=torch.float64) * (-dt / 200)
            integral = (1 / er_sde_scale(grid)).sum() * (-dt / 200)
            slope = (denoised - estimates[-1]) / (sigma - values[i - 1])
            x = x + (dt + integral * er_sde_scale(sigma_next)) * slope
            if slopes:
                integral_u = ((grid - sigma) / er_sde_scale(grid)).sum() * (-dt / 200)
                curvature = (slope - slopes[-1]) / ((sigma - values[i - 2]) / 2)
                x = x + (dt**2 / 2 + integral_u * er_sde_scale(sigma_next)) * curvature
            slopes.append(slope)
        x = x + draw() * (sigma_next**2 - sigma**2 * r**2).clamp(min=0).sqrt()
        estimates.append(denoised)
    assert_agrees(sample("er_sde"), x)


def lagrange_weights(nodes: list[float], lambda_s: float, lambda_t: float, tau: float,
                     sigma_t: float) -> list[float]:
    """b_j = alpha_t * integral of (1 + tau^2) e^((1 + tau^2)(l - l_t)) L_j(l) over [l_s, l_t]
    (SA-Solver eqs. 15/18), by 40-point Gauss-Legendre quadrature."""
    points, weights = torch.from_numpy(numpy.array(numpy.polynomial.legendre.leggauss(40)))
    k = 1 + tau**2
    lam = (lambda_t - lambda_s) / 2 * points + (lambda_t + lambda_s) / 2
    kernel = k * torch.exp(k * (lam - lambda_t)) * (lambda_t - lambda_s) / 2
    result = []
    for j, node in enumerate(nodes):
        basis = torch.ones_like(lam)
        for m, other in enumerate(nodes):
            if m != j:
                basis = basis * (lam - other) / (node - other)
        result.append(float((weights * kernel * basis).sum()) * sigma_t * math.exp(lambda_t))
    return result


def test_sa_solver_predictor_corrector_weights() -> None:
    """SA-Solver, predictor order 3 and corrector order 4, tau = 1 inside [sigma(80%),
    sigma(20%)] (given here as sigmas): predicted x_t = (s_t / s_s) e^(-tau^2 h) x + sum b_j D_j
    + noise; after evaluating at t the corrector redoes the step with D_t among the nodes and
    adds the same noise."""
    start_sigma, end_sigma = 3.0, 0.3
    values = SIGMAS.double().tolist()
    lambdas = [-math.log(s) if s > 0 else math.inf for s in values]
    x_pred, x, draw = start().double(), start().double(), stream(start().shape)
    estimates: list[Tensor] = []
    tau = h = 0.0
    noise: Tensor | float = 0.0
    last = len(values) - 1
    for i, sigma, sigma_next in steps():
        estimates.append(pair(x_pred, sigma)[0])
        corrector = 0 if i == 0 or sigma_next == 0 else min(4, len(estimates), last - i)
        predictor = min(3, len(estimates), last - 1 - i)
        if corrector:  # redo the last step from the previous corrected x, D_i included
            nodes = lambdas[i - corrector + 1:i + 1]
            b = lagrange_weights(nodes, lambdas[i - 1], lambdas[i], tau, sigma)
            x = sigma / values[i - 1] * math.exp(-tau**2 * h) * x \
                + sum(w * e for w, e in zip(b, estimates[-corrector:], strict=True)) + noise
        else:
            x = x_pred
        if sigma_next == 0:
            x_pred = estimates[-1]
            break
        tau = 1.0 if start_sigma >= sigma_next >= end_sigma else 0.0
        nodes = lambdas[i - predictor + 1:i + 1]
        b = lagrange_weights(nodes, lambdas[i], lambdas[i + 1], tau, sigma_next)
        h = lambdas[i + 1] - lambdas[i]
        x_pred = sigma_next / sigma * math.exp(-tau**2 * h) * x \
            + sum(w * e for w, e in zip(b, estimates[-predictor:], strict=True))
        noise = draw() * sigma_next * math.sqrt(-math.expm1(-2 * tau**2 * h)) if tau else 0.0
        x_pred = x_pred + noise
    ours = sample("sa_solver", sde_start_sigma=start_sigma, sde_end_sigma=end_sigma)
    assert_agrees(ours, x_pred)


def test_a_model_without_guidance_is_its_own_uncond() -> None:
    """The CFG++ samplers on a plain denoiser take D as D_u: Euler CFG++ is then Euler."""
    x, sigma = start(), torch.tensor([2.0])
    denoised, uncond = denoise_with_uncond(exact_denoiser, x, sigma, {})
    assert torch.equal(denoised, uncond) and torch.equal(denoised, exact_denoiser(x, sigma))
    run = {name: get_sampler(name)(exact_denoiser, start(), SIGMAS, extra_args={},
                                   callback=None, noise=SeededNoise(SEED),
                                   options=SamplerOptions())
           for name in ("euler", "euler_cfg_pp", "dpmpp_2m", "dpmpp_2m_cfg_pp")}
    assert torch.allclose(run["euler_cfg_pp"], run["euler"], atol=1e-5)
    assert torch.allclose(run["dpmpp_2m_cfg_pp"], run["dpmpp_2m"], atol=1e-5)


def test_dpmpp_2m_sde_heun_is_2m_sde_with_the_heun_correction() -> None:
    pytest.importorskip("torchsde")
    assert torch.equal(sample("dpmpp_2m_sde_heun"), sample("dpmpp_2m_sde", solver_type="heun"))
    assert torch.equal(sample("dpmpp_2m_sde_heun_gpu"), sample("dpmpp_2m_sde_heun"))
    assert not torch.equal(sample("dpmpp_2m_sde_heun"), sample("dpmpp_2m_sde"))
