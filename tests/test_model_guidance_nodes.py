"""Guidance patch nodes (nodes/model_guidance.py) against their papers' equations, with the
references written out independently here in float64 numpy; each node is also checked to put
its function at the right patch point of the MODEL it returns."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from engine.diffusion.sampling import guidance_patches as patches
from engine.diffusion.sampling.guidance import Guider
from engine.diffusion.sampling.perp_neg import PerpNegGuider
from nodes import model_guidance as nodes
from tests.diffusion.test_guidance import fake_model, inputs_for, prompt

SHAPE = (2, 4, 6, 6)


def tensors(seed: int, count: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=generator, dtype=torch.float64) for _ in range(count)]


def post_args(scale: float = 5.0, seed: int = 0) -> dict[str, Any]:
    x, cond, uncond = tensors(seed, 3)
    sigma = torch.tensor([2.5, 0.7], dtype=torch.float64)
    return {"input": x, "cond_denoised": cond, "uncond_denoised": uncond, "cond_scale": scale,
            "denoised": uncond + (cond - uncond) * scale, "sigma": sigma,
            "cond": x - cond, "uncond": x - uncond}


def np_(t: Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float64)


def per_sample(values: np.ndarray) -> np.ndarray:
    return values.reshape(-1, 1, 1, 1)


def test_rescale_cfg_rescales_the_v_prediction_std_to_the_positive() -> None:
    args = post_args()
    x, c0, u0, s = (np_(args[k]) for k in ("input", "cond_denoised", "uncond_denoised", "sigma"))
    s = per_sample(s)
    alpha, sigma_vp = 1 / np.sqrt(1 + s**2), s / np.sqrt(1 + s**2)
    eps_c, eps_u = (x - c0) / s, (x - u0) / s
    v_c, v_u = alpha * eps_c - sigma_vp * c0, alpha * eps_u - sigma_vp * u0
    v_cfg = v_u + 5.0 * (v_c - v_u)
    std = lambda v: v.reshape(2, -1).std(axis=1, ddof=1).reshape(-1, 1, 1, 1)  # noqa: E731
    v_final = 0.7 * v_cfg * std(v_c) / std(v_cfg) + 0.3 * v_cfg
    expected = alpha * (x * alpha) - sigma_vp * v_final
    got = x - np_(patches.rescale_cfg(0.7)(args))
    assert np.allclose(got, expected, atol=1e-10)


def test_renorm_cfg_caps_the_guided_norm_at_a_multiple_of_the_positive() -> None:
    args = post_args()
    args["timestep"] = args["sigma"]
    x, c0, u0 = (np_(args[k]) for k in ("input", "cond_denoised", "uncond_denoised"))
    guided = u0 + 5.0 * (c0 - u0)
    limit = 1.5 * np.sqrt((c0**2).reshape(2, -1).sum(1)).reshape(-1, 1, 1, 1)
    norm = np.sqrt((guided**2).reshape(2, -1).sum(1)).reshape(-1, 1, 1, 1)
    expected = np.where(norm >= limit, guided * limit / norm, guided)
    got = x - np_(patches.renorm_cfg(100.0, 1.5, 4)(args))
    assert np.allclose(got, expected, atol=1e-10)


def test_renorm_cfg_above_the_truncation_sigma_keeps_the_positive() -> None:
    args = post_args()
    args["timestep"] = args["sigma"]
    got = args["input"] - patches.renorm_cfg(0.5, 1.5, 4)(args)  # sigmas 2.5, 0.7 >= 0.5
    assert torch.allclose(got, args["cond_denoised"])


def test_cfg_zero_star_scales_the_uncond_by_the_optimal_projection() -> None:
    args = post_args()
    x, c0, u0 = (np_(args[k]) for k in ("input", "cond_denoised", "uncond_denoised"))
    noise_c, noise_u = (x - c0).reshape(2, -1), (x - u0).reshape(2, -1)
    alpha = per_sample((noise_c * noise_u).sum(1) / ((noise_u**2).sum(1) + 1e-8))
    expected = alpha * u0 + 5.0 * (c0 - alpha * u0)
    assert np.allclose(np_(patches.cfg_zero_star(args)), expected, atol=1e-10)


def test_cfg_norm_caps_the_channel_norm_at_the_positive_ones() -> None:
    args = post_args()
    guided, c0 = np_(args["denoised"]), np_(args["cond_denoised"])
    ratio = np.linalg.norm(c0, axis=1, keepdims=True) / (
        np.linalg.norm(guided, axis=1, keepdims=True) + 1e-8)
    expected = guided * np.clip(ratio, 0, 1) * 0.8
    assert np.allclose(np_(patches.cfg_norm(0.8)(args)), expected, atol=1e-10)


def test_epsilon_scaling_divides_the_noise_prediction() -> None:
    args = post_args()
    x, guided = np_(args["input"]), np_(args["denoised"])
    expected = x - (x - guided) / 1.005
    assert np.allclose(np_(patches.epsilon_scaling(1.005)(args)), expected, atol=1e-12)


def test_temporal_score_rescaling_moves_x0_by_the_snr_ratio() -> None:
    args = post_args()
    x, guided, s = np_(args["input"]), np_(args["denoised"]), np_(args["sigma"])
    snr = 1 / s**2  # alpha = 1 in the variance-exploding picture
    ratio = per_sample((snr * 0.25 + 1) / (snr * 0.25 / 0.9 + 1))
    expected = x + ratio * (guided - x)
    got = patches.temporal_score_rescaling(0.9, 0.5)(args)
    assert np.allclose(np_(got), expected, atol=1e-10)


def test_temporal_score_rescaling_with_k_one_changes_nothing() -> None:
    args = post_args()
    assert patches.temporal_score_rescaling(1.0, 0.5)(args) is args["denoised"]


def test_mahiro_weighs_by_the_cosine_of_the_signed_roots() -> None:
    args = post_args()
    guided, c0, u0 = (np_(args[k]) for k in ("denoised", "cond_denoised", "uncond_denoised"))
    leap, u_leap = c0 * 5.0, u0 * 5.0
    root = lambda v: np.sqrt(np.abs(v)) * np.sign(v)  # noqa: E731
    a, b = root(u_leap), root((leap + guided) / 2)
    cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1),
                                         1e-8)
    weight = 2 * (cosine.mean() + 1)
    expected = (weight * guided + (4 - weight) * leap) / 4
    assert np.allclose(np_(patches.mahiro(args)), expected, atol=1e-10)


def pre_args(seed: int = 0, scale: float = 5.0) -> dict[str, Any]:
    x, cond, uncond = tensors(seed, 3)
    return {"input": x, "conds_out": [cond, uncond], "conds": [("c",), ("u",)],
            "cond_scale": scale, "sigma": torch.tensor([3.0, 3.0], dtype=torch.float64)}


def np_spectrum_scale(x: np.ndarray, low: float, high: float, cutoff: int) -> np.ndarray:
    """Scale frequencies |k_y|, |k_x| < cutoff (the centred square) by low, others by high."""
    height, width = x.shape[-2:]
    ky = np.fft.fftfreq(height) * height  # signed integer frequencies
    kx = np.fft.fftfreq(width) * width
    # the centred square [H/2 - c, H/2 + c) holds frequencies -c .. c - 1 after fftshift
    inside = ((ky >= -cutoff) & (ky < cutoff))[:, None] & ((kx >= -cutoff) & (kx < cutoff))[None]
    mask = np.where(inside, low, high)
    return np.fft.ifft2(np.fft.fft2(x) * mask).real


def test_fresca_scales_the_guidance_per_frequency_band() -> None:
    args = pre_args()
    cond, uncond = (np_(t) for t in args["conds_out"])
    expected = np_spectrum_scale(cond - uncond, 0.5, 1.5, 2) + uncond
    out = patches.fresca(0.5, 1.5, 2)(args)
    assert np.allclose(np_(out[0]), expected, atol=1e-6) and out[1] is args["conds_out"][1]


def test_fresca_leaves_a_missing_uncond_alone() -> None:
    args = pre_args()
    args["conds"] = [("c",), None]
    assert patches.fresca(0.5, 1.5, 2)(args) is args["conds_out"]


def test_tcfg_keeps_only_the_uncond_score_along_the_principal_direction() -> None:
    args = pre_args()
    x = np_(args["input"])
    cond, uncond = (np_(t) for t in args["conds_out"])
    expected = []
    for index in range(2):
        scores = np.stack([(x - uncond)[index].ravel(), (x - cond)[index].ravel()])
        direction = np.linalg.svd(scores, full_matrices=False)[2][0]
        damped = (scores[0] @ direction) * direction
        expected.append(x[index] - damped.reshape(x.shape[1:]))
    out = patches.tcfg(args)
    assert np.allclose(np_(out[1]), np.stack(expected), atol=1e-5)
    assert out[0] is args["conds_out"][0]


def apg_reference(steps: list[dict[str, Any]], eta: float, threshold: float,
                  momentum: float) -> list[np.ndarray]:
    running = None
    results = []
    for args in steps:
        cond, uncond = (np_(t) for t in args["conds_out"])
        guidance = cond - uncond
        if momentum:
            running = guidance if running is None else momentum * running + guidance
            guidance = running
        norm = np.sqrt((guidance**2).reshape(2, -1).sum(1)).reshape(-1, 1, 1, 1)
        guidance = guidance * np.minimum(1.0, threshold / norm)
        unit = cond / np.sqrt((cond**2).reshape(2, -1).sum(1)).reshape(-1, 1, 1, 1)
        parallel = (guidance * unit).reshape(2, -1).sum(1).reshape(-1, 1, 1, 1) * unit
        guided = uncond + (guidance - parallel) + eta * parallel
        results.append(guided + (cond - uncond) / args["cond_scale"])
    return results


def test_apg_projects_clips_and_averages_the_guidance_over_steps() -> None:
    steps = [pre_args(seed) for seed in (1, 2, 3)]
    for index, args in enumerate(steps):
        args["sigma"] = torch.tensor([3.0 - index, 3.0 - index])
    guidance = patches.AdaptiveProjectedGuidance(eta=0.5, norm_threshold=4.0, momentum=-0.5)
    got = [np_(guidance(args)[0]) for args in steps]
    for ours, reference in zip(got, apg_reference(steps, 0.5, 4.0, -0.5), strict=True):
        assert np.allclose(ours, reference, atol=1e-10)


def test_apg_forgets_its_average_when_a_new_run_starts() -> None:
    first, second = pre_args(1), pre_args(2)
    second["sigma"] = torch.tensor([9.0, 9.0])  # higher than the last step: a new run
    guidance = patches.AdaptiveProjectedGuidance(eta=0.5, norm_threshold=4.0, momentum=0.5)
    guidance(first)
    fresh = patches.AdaptiveProjectedGuidance(eta=0.5, norm_threshold=4.0, momentum=0.5)
    assert torch.allclose(guidance(second)[0], fresh(second)[0])


class StubSampling:
    """timestep(sigma) = 100 * sigma: enough to check Differential Diffusion's thresholds."""

    sigma_min = torch.tensor(0.1)

    def timestep(self, sigma: Tensor) -> Tensor:
        return sigma * 100


class StubModel:
    model_sampling = StubSampling()


@pytest.mark.parametrize(("sigma", "strength", "expected"), [
    (10.0, 1.0, [0.0, 0.0, 1.0]),  # the first step: threshold 1, only cells of 1.0
    (5.0, 1.0, [0.0, 1.0, 1.0]),  # half way (threshold ~0.5): cells >= 0.5
    (5.0, 0.5, [0.1, 0.8, 1.0])])  # half binary, half the soft mask
def test_differential_diffusion_denoises_cells_above_the_progress_threshold(
        sigma: float, strength: float, expected: list[float]) -> None:
    mask = torch.tensor([0.2, 0.6, 1.0])
    schedule = torch.tensor([10.0, 5.0, 0.0])
    function = patches.differential_diffusion(strength)
    out = function(torch.tensor([sigma]), mask, {"model": StubModel(), "sigmas": schedule})
    threshold = (sigma * 100 - 10) / (1000 - 10)
    binary = (mask >= threshold).float()
    reference = binary if strength == 1.0 else strength * binary + (1 - strength) * mask
    assert torch.allclose(out, reference) and torch.allclose(out, torch.tensor(expected))


def guided_out(model: Any, cfg: float = 5.0, negative: float = 3.0) -> Tensor:
    guidance = Guider(model, [prompt(1)], [prompt(negative)], cfg).prepare(
        inputs_for((1, 4, 8, 8)))
    return guidance(torch.zeros(1, 4, 8, 8), torch.ones(1))


@pytest.mark.parametrize(("node", "inputs", "field"), [
    (nodes.RescaleCFG, {"multiplier": 0.7}, "sampler_cfg_function"),
    (nodes.RenormCFG, {"cfg_trunc": 100.0, "renorm_cfg": 1.0}, "sampler_cfg_function"),
    (nodes.CFGZeroStar, {}, "sampler_post_cfg_function"),
    (nodes.CFGNorm, {"strength": 1.0}, "sampler_post_cfg_function"),
    (nodes.APG, {"eta": 1.0, "norm_threshold": 5.0, "momentum": 0.0},
     "sampler_pre_cfg_function"),
    (nodes.TCFG, {}, "sampler_pre_cfg_function"),
    (nodes.Mahiro, {}, "sampler_post_cfg_function"),
    (nodes.FreSca, {"scale_low": 1.0, "scale_high": 1.25, "freq_cutoff": 20},
     "sampler_pre_cfg_function"),
    (nodes.EpsilonScaling, {"scaling_factor": 1.005}, "sampler_post_cfg_function"),
    (nodes.TemporalScoreRescaling, {"tsr_k": 0.95, "tsr_sigma": 1.0},
     "sampler_post_cfg_function"),
    (nodes.PerturbedAttentionGuidance, {"scale": 3.0}, "sampler_post_cfg_function"),
    (nodes.DifferentialDiffusion, {"strength": 1.0}, "denoise_mask_function")])
def test_each_node_patches_a_clone_at_its_point(node: Any, inputs: dict[str, Any],
                                                field: str) -> None:
    model, _ = fake_model()
    (patched,) = node().execute(None, model, **inputs)
    assert getattr(patched.model_patches, field) and model.model_patches.empty
    if field != "denoise_mask_function":
        guided_out(patched)  # runs through guidance without error


def test_epsilon_scaling_node_changes_the_guided_prediction() -> None:
    model, _ = fake_model()
    (patched,) = nodes.EpsilonScaling().execute(None, model, scaling_factor=1.25)
    plain, scaled = guided_out(model), guided_out(patched)
    assert torch.allclose(scaled, plain / 1.25)  # x = 0: x - (x - x0) / f = x0 / f


def perp_neg_reference(cond: float, uncond: float, empty: float, neg_scale: float,
                       cfg: float) -> float:
    """Constant-valued predictions: the perpendicular part of a parallel negative is zero."""
    positive, negative = cond - empty, uncond - empty
    perpendicular = negative - (negative * positive) / (positive * positive) * positive
    return empty + cfg * (positive - neg_scale * perpendicular)


def test_perp_neg_node_and_guider_agree_with_the_formula() -> None:
    model, _ = fake_model()
    empty = [prompt(0.5)]
    (patched,) = nodes.PerpNeg().execute(None, model, empty_conditioning=empty, neg_scale=2.0)
    x0 = {"cond": -1.0, "uncond": -3.0, "empty": -0.5}  # x0 = -value at x = 0, sigma = 1
    expected = perp_neg_reference(x0["cond"], x0["uncond"], x0["empty"], 2.0, 5.0)
    assert torch.allclose(guided_out(patched), torch.full((1, 4, 8, 8), expected))
    guider = PerpNegGuider(model, [prompt(1)], [prompt(3)], 5.0, empty, 2.0)
    out = guider.prepare(inputs_for((1, 4, 8, 8)))(torch.zeros(1, 4, 8, 8), torch.ones(1))
    assert torch.allclose(out, torch.full((1, 4, 8, 8), expected))


def test_perp_neg_removes_a_negative_perpendicular_to_the_positive() -> None:
    x = torch.zeros(1, 2, 1, 1)
    cond, uncond, empty = (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.zeros(2))
    from engine.diffusion.sampling.perp_neg import perp_neg
    out = perp_neg(x, cond.view(1, 2, 1, 1), uncond.view(1, 2, 1, 1), empty.view(1, 2, 1, 1),
                   neg_scale=1.0, cond_scale=3.0)
    assert torch.allclose(out.flatten(), torch.tensor([3.0, -3.0]))


def test_perp_neg_guider_skips_the_negative_when_its_scale_is_zero() -> None:
    model, unet = fake_model()
    guider = PerpNegGuider(model, [prompt(1)], [prompt(3)], 5.0, [prompt(0.5)], 0.0)
    guider.prepare(inputs_for((1, 4, 8, 8)))(torch.zeros(1, 4, 8, 8), torch.ones(1))
    assert sum(call.x.shape[0] for call in unet.calls) == 2  # positive and empty only
