"""ComfyUI's `comfy.sample` for custom-node packs: initial noise and the sampling entry points,
over Loom's KSampler (same seeds, same schedules, same images)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from comfy.samplers import CFGGuider, KSampler
from engine.comfy_host import from_pack
from engine.diffusion.sampling import initial_noise
from engine.diffusion.sampling.ksampler import fit_latent_channels

__all__ = ["fix_empty_latent_channels", "np", "prepare_noise", "sample", "sample_custom"]


def prepare_noise(latent_image: Tensor, seed: int, noise_inds: Any = None) -> Tensor:
    """ComfyUI's initial noise: a CPU generator seeded with `seed` (batch_index honoured)."""
    return initial_noise(latent_image, seed, list(noise_inds) if noise_inds is not None else None)


def fix_empty_latent_channels(model: Any, latent_image: Tensor) -> Tensor:
    return fit_latent_channels(from_pack(model), latent_image)


def sample(model: Any, noise: Tensor, steps: int, cfg: float, sampler_name: str,
           scheduler: str, positive: Any, negative: Any, latent_image: Tensor,
           denoise: float = 1.0, disable_noise: bool = False, start_step: int | None = None,
           last_step: int | None = None, force_full_denoise: bool = False,
           noise_mask: Tensor | None = None, sigmas: Tensor | None = None,
           callback: Any = None, disable_pbar: bool = False, seed: int | None = None) -> Tensor:
    sampler = KSampler(model, steps, None, sampler_name, scheduler, denoise)
    samples = sampler.sample(noise, positive, negative, cfg, latent_image, start_step,
                             last_step, force_full_denoise, noise_mask, sigmas, callback,
                             disable_pbar, seed)
    return samples.to(torch.device("cpu"))


def sample_custom(model: Any, noise: Tensor, cfg: float, sampler: Any, sigmas: Tensor,
                  positive: Any, negative: Any, latent_image: Tensor,
                  noise_mask: Tensor | None = None, callback: Any = None,
                  disable_pbar: bool = False, seed: int | None = None) -> Tensor:
    guider = CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider.sample(noise, latent_image, sampler, sigmas, noise_mask, callback,
                         disable_pbar, seed).to(torch.device("cpu"))
