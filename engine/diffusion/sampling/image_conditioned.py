"""The extra model inputs of the two image-conditioned SD2-era models, built per conditioning
entry just before sampling (conditioning.py calls these), by ComfyUI's rules:

* The SD x4 upscaler (stabilityai's LatentUpscaleDiffusion) sees the low-resolution image as
  3 extra input channels: the entry's ``concat_image`` (pixels in -1..1 from
  SD_4XUpscale_Conditioning; black without one), resized bilinearly (centre crop) to the
  latent's size and, when ``noise_augmentation`` > 0, noised to level
  ``round(350 * noise_augmentation)`` of its own 1000-step schedule (linear betas
  sqrt-spaced from 0.0001 to 0.02, LDM's ImageConcatWithNoiseAugmentation capped at 350):
  ``sqrt(abar_t) * image + sqrt(1 - abar_t) * noise``, the noise drawn on the CPU from the
  run's seed minus 10. The level itself is the UNet's class label ``y``.
* Lotus-D's ``y`` is its task embedding: ``[sin 1, sin 0, cos 1, cos 0]`` (the depth/normal
  switch [1, 0], embedded as Lotus was trained); its prompt is the fixed null embedding
  LotusConditioning gives (``data/lotus_null_prompt.safetensors``).
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from torch import Tensor

from engine.diffusion.networks.model_sampling import scaled_linear_betas
from engine.image_ops import resize_center, spread_to_batch

X4_MAX_NOISE_LEVEL = 350
X4_AUGMENT_BETAS = (0.0001, 0.02)
X4_SEED_OFFSET = 10  # ComfyUI draws the low-res noise from seed - 10
X4_IMAGE_CHANNELS = 3
LOTUS_TASK = (1.0, 0.0)  # Lotus-D's task switch as ComfyUI sets it
LOTUS_PROMPT_FILE = "lotus_null_prompt.safetensors"
LOTUS_PROMPT_KEY = "prompt_embeds"


def x4_noise_level(noise_augmentation: float) -> int:
    """The augmentation level (0..350) for SD_4XUpscale_Conditioning's 0..1 setting."""
    return round(X4_MAX_NOISE_LEVEL * noise_augmentation)


def _x4_augment_scales() -> tuple[Tensor, Tensor]:
    """(sqrt(abar), sqrt(1 - abar)) per level: float64 products, stored as float32."""
    betas = scaled_linear_betas(*X4_AUGMENT_BETAS, 1000)
    abar = torch.cumprod(1.0 - betas, dim=0)
    return abar.sqrt().float(), (1.0 - abar).sqrt().float()


def x4_augment(image: Tensor, level: int, seed: int) -> Tensor:
    """`image` noised to augmentation `level`, the noise drawn on the CPU from `seed`."""
    signal, noise_scale = _x4_augment_scales()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(image.shape, generator=generator, dtype=image.dtype)
    return (signal[level].to(image.device) * image
            + noise_scale[level].to(image.device) * noise.to(image.device))


def x4_concat(options: Mapping[str, Any], noise_shape: torch.Size, device: torch.device,
              seed: int) -> Tensor:
    """The x4 upscaler's 3 low-res channels (B, 3, H, W) for one conditioning entry."""
    batch, _, height, width = noise_shape
    image = options.get("concat_image")
    if image is None:
        image = torch.zeros((batch, X4_IMAGE_CHANNELS, height, width), device=device)
    else:
        image = image.to(device, torch.float32)
        if tuple(image.shape[-2:]) != (height, width):
            image = resize_center(image, height, width)
    augmentation = float(options.get("noise_augmentation", 0.0))
    if augmentation > 0:
        image = x4_augment(image, x4_noise_level(augmentation), seed - X4_SEED_OFFSET)
    return spread_to_batch(image, batch)


def x4_class_label(options: Mapping[str, Any], device: torch.device) -> Tensor:
    """The x4 upscaler's `y`: the entry's augmentation level as a (1,) class label."""
    level = x4_noise_level(float(options.get("noise_augmentation", 0.0)))
    return torch.tensor([level], dtype=torch.long, device=device)


def lotus_task_embedding(device: torch.device) -> Tensor:
    """Lotus-D's `y`, shape (1, 4): sin and cos of the task switch."""
    task = torch.tensor(LOTUS_TASK, dtype=torch.float32, device=device)
    return torch.cat([task.sin(), task.cos()]).unsqueeze(0)


def lotus_null_prompt() -> Tensor:
    """Lotus's null-prompt embedding (1, 2, 1024) float32: its frozen text encoder's output
    for an empty prompt, as ComfyUI 0.8.0 inlines it (see data/README.md)."""
    data = resources.files("engine.diffusion.sampling").joinpath("data", LOTUS_PROMPT_FILE)
    return load_safetensors(data.read_bytes())[LOTUS_PROMPT_KEY]
