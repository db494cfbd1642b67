"""The MODEL value nodes pass around: a shared network plus everything a clone may change
(sampling parameterisation, patches). Handles are never mutated; nodes derive new ones."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from engine.diffusion.networks.model_sampling import (
    ModelSampling,
    continuous_model_sampling,
    model_sampling,
)
from engine.diffusion.networks.unet import UNet, UNetConfig
from engine.diffusion.patches.model_patches import ModelPatches


@dataclass(frozen=True)
class LatentFormat:
    """How a family's latents relate to pixels: the VAE scale and a linear latent -> RGB map
    used for live previews (factors are ComfyUI's published constants)."""

    scale: float
    channels: int
    rgb_factors: tuple[tuple[float, float, float], ...]
    rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def preview_rgb(self, latent: Tensor) -> Tensor:
        """[C, H, W] latent -> [H, W, 3] approximate image in 0..1."""
        factors = torch.tensor(self.rgb_factors, dtype=torch.float32)  # (C, 3)
        bias = torch.tensor(self.rgb_bias, dtype=torch.float32)
        rgb = torch.einsum("chw,cr->hwr", latent.float().cpu(), factors) + bias
        return ((rgb + 1) / 2).clamp(0, 1)


SD1_LATENT = LatentFormat(0.18215, 4, ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350),
                                       (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)))
SDXL_LATENT = LatentFormat(0.13025, 4, ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068),
                                        (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
                           (0.1084, -0.0175, -0.0011))
# The x4 upscaler's KL-f4 latents (ComfyUI's SD_X4 format).
SD_X4_LATENT = LatentFormat(0.08333, 4, ((-0.2340, -0.3863, -0.3257), (0.0994, 0.0885, -0.0908),
                                         (-0.2833, -0.2349, -0.3741), (0.2523, -0.0055, -0.1651)))
LATENT_FORMATS = {"sd1": SD1_LATENT, "sd2": SD1_LATENT, "sdxl": SDXL_LATENT,
                  "sdxl_refiner": SDXL_LATENT, "sd_x4": SD_X4_LATENT, "lotus": SD1_LATENT}
# (linear_start, linear_end) of a family's DDPM betas where they are not SD's 0.00085..0.012
# (ComfyUI's sampling_settings): the x4 upscaler was trained on 0.0001..0.02.
BETA_RANGES = MappingProxyType({"sd_x4": (0.0001, 0.02)})


def family_sampling(family: str, prediction: str, zsnr: bool = False) -> ModelSampling:
    """The discrete schedule a `family` model was trained on, with `prediction`."""
    start, end = BETA_RANGES.get(family, (0.00085, 0.012))
    return model_sampling(prediction, zsnr=zsnr, linear_start=start, linear_end=end)


@dataclass(frozen=True, eq=False)
class ModelHandle:
    """A diffusion model: `unet` is shared by every clone; the rest belongs to this handle."""

    unet: UNet
    config: UNetConfig
    family: str
    sampling: ModelSampling
    latent_format: LatentFormat
    dtype: torch.dtype
    device: torch.device
    name: str = ""
    # Weight patches, residual providers and attention hooks (LoRA/ControlNet, issue 6).
    patches: tuple[Any, ...] = field(default_factory=tuple)
    # Behaviour patches run at fixed points of the UNet and of guidance (model_patches.py).
    model_patches: ModelPatches = field(default_factory=ModelPatches)

    @classmethod
    def create(cls, unet: UNet, config: UNetConfig, family: str, prediction: str = "eps",
               zsnr: bool = False, name: str = "", device: torch.device | None = None,
               edm_sigmas: tuple[float, float] | None = None) -> ModelHandle:
        """A handle computing on `device` (default: where the weights are; the model manager
        moves weights that rest elsewhere there when the UNet runs). `edm_sigmas` (min, max):
        a continuous EDM schedule (CosXL's) instead of the discrete SD one."""
        param = next(unet.parameters())
        name_of = _prediction_name(prediction)
        sampling = (continuous_model_sampling(name_of, *edm_sigmas) if edm_sigmas
                    else family_sampling(family, name_of, zsnr))
        return cls(unet, config, family, sampling, LATENT_FORMATS[family], unet.dtype,
                   device or param.device, name)

    def replace(self, **changes: Any) -> ModelHandle:
        """A clone with some fields changed; the network is shared, never copied."""
        return dataclasses.replace(self, **changes)

    def patching(self, change: Callable[[ModelPatches], ModelPatches]) -> ModelHandle:
        """A clone whose behaviour patches are `change(current ones)`, e.g.
        ``model.patching(lambda p: p.adding_unet_patch("output_block_patch", freeu))``."""
        return self.replace(model_patches=change(self.model_patches))

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def is_inpaint(self) -> bool:
        return self.config.in_channels == 9

    def __loom_digest__(self) -> None:
        """Not content-hashable: downstream cache keys use the loader's key instead."""
        return None

    def __loom_nbytes__(self) -> int:
        """Weights are accounted by the model manager, not the output cache."""
        return 0


def _prediction_name(prediction: str) -> str:
    return {"v": "v_prediction", "eps": "eps"}.get(prediction, prediction)
