"""Guidance patches of ComfyUI's model-patch nodes, as ModelPatches callables (their papers'
equations, in ComfyUI's argument dicts; patches/model_patches.py lists the keys).

Predictions are x0 ("denoised"); a noise prediction is x - x0. Each factory returns the
callable a node registers: a `sampler_cfg_function`, a pre-CFG or a post-CFG function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.diffusion.patches.unet_tweaks import fourier_scale
from engine.diffusion.sampling.samplers_common import half_log_snr

Args = dict[str, Any]
NORM_EPS = 1e-8  # CFGNorm, CFG-Zero*: added to a norm before dividing by it


def _per_sample(values: Tensor, ndim: int) -> Tensor:
    """A (B,) tensor viewed to broadcast over (B, ...)."""
    return values.view(values.shape[:1] + (1,) * (ndim - 1))


def rescale_cfg(multiplier: float) -> Callable[[Args], Tensor]:
    """RescaleCFG (Lin et al. 2024, "Common Diffusion Noise Schedules...", Alg. 2): CFG done on
    v-predictions, its std rescaled to the positive's, blended by `multiplier`."""
    def cfg_function(args: Args) -> Tensor:
        cond, uncond, scale = args["cond"], args["uncond"], args["cond_scale"]
        sigma = _per_sample(args["sigma"], cond.ndim)
        x_orig = args["input"]
        x = x_orig / (sigma * sigma + 1.0)  # v-prediction has to be rebuilt from eps
        v_cond = ((x - (x_orig - cond)) * (sigma**2 + 1.0) ** 0.5) / sigma
        v_uncond = ((x - (x_orig - uncond)) * (sigma**2 + 1.0) ** 0.5) / sigma
        v_cfg = v_uncond + scale * (v_cond - v_uncond)
        ro_pos = torch.std(v_cond, dim=(1, 2, 3), keepdim=True)
        ro_cfg = torch.std(v_cfg, dim=(1, 2, 3), keepdim=True)
        v_final = multiplier * (v_cfg * (ro_pos / ro_cfg)) + (1.0 - multiplier) * v_cfg
        return x_orig - (x - v_final * sigma / (sigma * sigma + 1.0) ** 0.5)
    return cfg_function


def renorm_cfg(cfg_trunc: float, renorm: float, in_channels: int) -> Callable[[Args], Tensor]:
    """RenormCFG (Lumina-Image 2.0): below sigma `cfg_trunc`, CFG on the first `in_channels`
    channels with each sample's norm capped at `renorm` x the positive's; above it the
    positive alone. The channels past `in_channels` always come from the positive."""
    def cfg_function(args: Args) -> Tensor:
        cond, uncond = args["cond_denoised"], args["uncond_denoised"]
        cond_main, rest = cond[:, :in_channels], cond[:, in_channels:]
        guided = cond_main
        if float(args["timestep"][0]) < cfg_trunc:
            guided = uncond[:, :in_channels] + args["cond_scale"] * (cond_main
                                                                     - uncond[:, :in_channels])
            if renorm > 0.0:
                dims = tuple(range(1, cond_main.ndim))
                limit = torch.linalg.vector_norm(cond_main, dim=dims, keepdim=True) * renorm
                norm = torch.linalg.vector_norm(guided, dim=dims, keepdim=True)
                guided = torch.where(norm >= limit, guided * (limit / norm), guided)
        return args["input"] - torch.cat([guided, rest], dim=1)
    return cfg_function


def optimized_scale(positive: Tensor, negative: Tensor) -> Tensor:
    """CFG-Zero* (Fan et al. 2025) s* = <v_cond, v_uncond> / |v_uncond|^2 per sample."""
    positive_flat = positive.reshape(positive.shape[0], -1)
    negative_flat = negative.reshape(negative.shape[0], -1)
    dot = torch.sum(positive_flat * negative_flat, dim=1, keepdim=True)
    squared_norm = torch.sum(negative_flat**2, dim=1, keepdim=True) + NORM_EPS
    return (dot / squared_norm).reshape([positive.shape[0]] + [1] * (positive.ndim - 1))


def cfg_zero_star(args: Args) -> Tensor:
    """Post-CFG: the uncond scaled by s* before guidance (CFGZeroStar)."""
    x, scale = args["input"], args["cond_scale"]
    cond_x0, uncond_x0 = args["cond_denoised"], args["uncond_denoised"]
    alpha = optimized_scale(x - cond_x0, x - uncond_x0)
    return args["denoised"] + uncond_x0 * (alpha - 1.0) + scale * uncond_x0 * (1.0 - alpha)


def cfg_norm(strength: float) -> Callable[[Args], Tensor]:
    """Post-CFG: the guided x0 scaled down where its channel norm exceeds the positive's."""
    def post_cfg(args: Args) -> Tensor:
        guided = args["denoised"]
        cond_norm = torch.norm(args["cond_denoised"], dim=1, keepdim=True)
        guided_norm = torch.norm(guided, dim=1, keepdim=True)
        scale = (cond_norm / (guided_norm + NORM_EPS)).clamp(min=0.0, max=1.0)
        return guided * scale * strength
    return post_cfg


def epsilon_scaling(scaling_factor: float) -> Callable[[Args], Tensor]:
    """Post-CFG: the noise prediction divided by a constant (Ning et al. 2023, exposure bias,
    uniform schedule)."""
    factor = scaling_factor if scaling_factor != 0 else 1e-9

    def post_cfg(args: Args) -> Tensor:
        x = args["input"]
        return x - (x - args["denoised"]) / factor
    return post_cfg


def temporal_score_rescaling(tsr_k: float, tsr_sigma: float) -> Callable[[Args], Tensor]:
    """Post-CFG TSR (Xu et al. 2025, eq. 6): r = (snr v + 1) / (snr v / k + 1), v = tsr_sigma^2,
    and x0 moved to lerp(x / alpha, x0, r); alpha = sigma * exp(half_log_snr) = 1 for these
    variance-exploding schedules."""
    variance = tsr_sigma**2

    def post_cfg(args: Args) -> Tensor:
        denoised, x, sigma = args["denoised"], args["input"], args["sigma"]
        if tsr_k == 1 or bool((sigma == 0).all()):
            return denoised
        half_log = half_log_snr(sigma)
        snr = (2 * half_log).exp()
        ratio = torch.where(torch.isposinf(snr), torch.full_like(snr, tsr_k),
                            (snr * variance + 1) / (snr * variance / tsr_k + 1))
        alpha = _per_sample(sigma * half_log.exp(), x.ndim)
        return torch.lerp(x / alpha, denoised, _per_sample(ratio, x.ndim).to(denoised.dtype))
    return post_cfg


def mahiro(args: Args) -> Tensor:
    """Post-CFG "Mahiro": lean the guided x0 towards cond * scale by how little the uncond's and
    the guided result's signed square roots agree (cosine similarity)."""
    scale = args["cond_scale"]
    leap = args["cond_denoised"] * scale
    uncond_leap = args["uncond_denoised"] * scale
    guided = args["denoised"]
    merge = (leap + guided) / 2
    norm_uncond = torch.sqrt(uncond_leap.abs()) * uncond_leap.sign()
    norm_merge = torch.sqrt(merge.abs()) * merge.sign()
    similarity = F.cosine_similarity(norm_uncond, norm_merge).mean()
    weight = 2 * (similarity + 1)  # 0..4
    return (weight * guided + (4 - weight) * leap) / 4


def _both_sides(args: Args) -> bool:
    conds = args["conds"]
    return len(args["conds_out"]) > 1 and conds[0] is not None and conds[1] is not None


def fresca(scale_low: float, scale_high: float, freq_cutoff: int) -> Callable[[Args], list[Tensor]]:
    """Pre-CFG FreSca: the guidance cond - uncond rescaled per frequency band."""
    def pre_cfg(args: Args) -> list[Tensor]:
        out = args["conds_out"]
        if not _both_sides(args):
            return out
        cond, uncond = out[0], out[1]
        guidance = fourier_scale(cond - uncond, scale_low, scale_high, freq_cutoff)
        return [guidance + uncond, uncond, *out[2:]]
    return pre_cfg


def tangential_damping(cond_score: Tensor, uncond_score: Tensor) -> Tensor:
    """TCFG (Kwon et al. 2025): the uncond score projected on the first right singular vector
    of the [uncond; cond] score matrix, dropping its tangential part."""
    batch = cond_score.shape[0]
    cond_flat = cond_score.reshape(batch, 1, -1).float()
    uncond_flat = uncond_score.reshape(batch, 1, -1).float()
    _, _, vh = torch.linalg.svd(torch.cat((uncond_flat, cond_flat), dim=1), full_matrices=False)
    first = vh[:, 0:1, :]  # (B, 1, N)
    damped = (uncond_flat @ first.transpose(-2, -1)) * first
    return damped.reshape_as(uncond_score).to(uncond_score.dtype)


def tcfg(args: Args) -> list[Tensor]:
    """Pre-CFG TCFG: the uncond prediction's tangential component removed."""
    out = args["conds_out"]
    if not _both_sides(args):
        return out
    x = args["input"]
    cond, uncond = out[0], out[1]
    return [cond, x - tangential_damping(x - cond, x - uncond), *out[2:]]


def _project(vector: Tensor, onto: Tensor) -> tuple[Tensor, Tensor]:
    """(parallel, orthogonal) parts of `vector` along `onto`, per sample over (C, H, W)."""
    unit = F.normalize(onto, dim=[-1, -2, -3])
    parallel = (vector * unit).sum(dim=[-1, -2, -3], keepdim=True) * unit
    return parallel, vector - parallel


@dataclass(eq=False)
class AdaptiveProjectedGuidance:
    """Pre-CFG APG (Sadat et al. 2024): guidance with momentum, norm clipping and its parallel
    part scaled by eta. Keeps the running average of one sampling run (reset when sigma rises)."""

    eta: float
    norm_threshold: float
    momentum: float
    running: Tensor | None = field(default=None, repr=False)
    previous_sigma: float | None = field(default=None, repr=False)

    def __call__(self, args: Args) -> list[Tensor]:
        out = args["conds_out"]
        if len(out) == 1:
            return out
        cond, uncond, scale = out[0], out[1], args["cond_scale"]
        sigma = float(args["sigma"][0])
        if self.previous_sigma is not None and sigma > self.previous_sigma:
            self.running = None  # a new sampling run
        self.previous_sigma = sigma
        guidance = cond - uncond
        if self.momentum != 0:
            self.running = guidance if self.running is None else (
                self.momentum * self.running + guidance)
            guidance = self.running
        if self.norm_threshold > 0:
            norm = guidance.norm(p=2, dim=[-1, -2, -3], keepdim=True)
            guidance = guidance * torch.minimum(torch.ones_like(norm), self.norm_threshold / norm)
        parallel, orthogonal = _project(guidance, cond)
        guided = uncond + orthogonal + self.eta * parallel + (cond - uncond) / scale
        return [guided, uncond, *out[2:]]


def perturbed_attention_guidance(scale: float, replace_key: tuple[str, int] = ("middle", 0)
                                 ) -> Callable[[Args], Tensor]:
    """Post-CFG PAG (Ahn et al. 2024): the positive re-run with the middle block's self-attention
    made the identity (softmax -> I: out = v), and the guided x0 pushed away from it."""
    def identity_attention(q: Tensor, k: Tensor, v: Tensor, options: Any) -> Tensor:
        return v

    def post_cfg(args: Args) -> Tensor:
        guided = args["denoised"]
        if scale == 0:
            return guided
        patches = args["model_options"].replacing_attention("attn1", replace_key,
                                                            identity_attention)
        (perturbed,) = args["model"].calc_cond_batch([args["cond"]], args["input"],
                                                     args["sigma"], patches)
        return guided + (args["cond_denoised"] - perturbed) * scale
    return post_cfg


def differential_diffusion(strength: float = 1.0) -> Callable[..., Tensor]:
    """Denoise-mask function of Differential Diffusion (Levin & Fried 2023): at each step only
    the mask cells >= the run's progress threshold are denoised; `strength` < 1 blends the
    binary mask with the soft one."""
    def mask_function(sigma: Tensor, denoise_mask: Tensor, extra_options: Args) -> Tensor:
        sampling = extra_options["model"].model_sampling
        step_sigmas = extra_options["sigmas"]
        sigma_to = sampling.sigma_min
        if step_sigmas[-1] > sigma_to:
            sigma_to = step_sigmas[-1]
        ts_from = sampling.timestep(step_sigmas[0])
        ts_to = sampling.timestep(sigma_to)
        current = sampling.timestep(sigma[0])
        threshold = (current - ts_to) / (ts_from - ts_to)
        binary = (denoise_mask >= threshold).to(denoise_mask.dtype)
        if strength and strength < 1:
            return strength * binary + (1 - strength) * denoise_mask
        return binary
    return mask_function
