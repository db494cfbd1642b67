"""unCLIP's CLIP-embedding noise augmentation (Ramesh et al. 2022; Stability's SD 2.1 unCLIP):
an image embedding is noised to a level on a 1000-step "squaredcos_cap_v2" schedule (Nichol &
Dhariwal 2021, the cosine alpha-bar with betas capped at 0.999) and paired with the sinusoidal
embedding of that level. The released models use mean 0 / std 1 statistics, so the embedding
is noised as it is: z = sqrt(abar_t) * x + sqrt(1 - abar_t) * noise."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from engine.diffusion.networks.unet import timestep_embedding

MAX_NOISE_LEVEL = 1000
MAX_BETA = 0.999


def _alphas_cumprod(steps: int = MAX_NOISE_LEVEL) -> Tensor:
    """alpha-bar of the squaredcos_cap_v2 schedule, in float64 then float32 as LDM stores it."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), MAX_BETA)
                          for i in range(steps)], dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).float()


def noise_level_for(noise_augmentation: float) -> int:
    """unCLIPConditioning's 0..1 noise_augmentation as a schedule step (ComfyUI's rounding)."""
    return round((MAX_NOISE_LEVEL - 1) * noise_augmentation)


def augment(embeds: Tensor, noise_level: int, seed: int | None) -> tuple[Tensor, Tensor]:
    """(noised embeds (B, D), embedding of the level (B, D)) for (B, D) embeds; the noise is
    drawn on the CPU from `seed` (a fresh random seed when None)."""
    abar = _alphas_cumprod()[noise_level]
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    noise = torch.randn(embeds.shape, generator=generator, dtype=embeds.dtype)
    noised = abar.sqrt() * embeds + (1 - abar).sqrt() * noise.to(embeds.device)
    level = torch.full((embeds.shape[0],), float(noise_level), device=embeds.device)
    return noised, timestep_embedding(level, embeds.shape[1]).to(embeds.dtype)


def unclip_adm(entries: list[dict], device: torch.device, seed: int | None,
               merge_augmentation: float = 0.0) -> Tensor:
    """The `y` vector of an unCLIP model from unCLIPConditioning's entries: per image, the
    noised embedding and its level's embedding, times the entry's strength; several images
    are summed and their embedding part noised again at `merge_augmentation`."""
    parts = []
    for entry in entries:
        for embed in entry["clip_vision_output"].image_embeds:
            level = noise_level_for(entry["noise_augmentation"])
            noised, level_embed = augment(embed[None].to(device, torch.float32), level, seed)
            parts.append(torch.cat([noised, level_embed], dim=1) * entry["strength"])
    if not parts:
        raise ValueError("unclip_conditioning holds no image embedding; connect a CLIP Vision "
                         "Encode output to unCLIPConditioning")
    if len(parts) == 1:
        return parts[0]
    summed = torch.stack(parts).sum(0)
    width = summed.shape[1] // 2
    # ComfyUI draws this noise from its global generator; Loom keeps it seeded (reproducible)
    noised, level_embed = augment(summed[:, :width], noise_level_for(merge_augmentation), seed)
    return torch.cat([noised, level_embed], dim=1)
