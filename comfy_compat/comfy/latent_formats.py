"""ComfyUI's `comfy.latent_formats` for custom-node packs: the SD1/SD2, SDXL and SD x4 formats
(scale and latent -> RGB preview factors) from Loom's model handle constants."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from engine.diffusion.patches.model_handle import (
    LATENT_FORMATS,
    SD1_LATENT,
    SD_X4_LATENT,
    SDXL_LATENT,
)


class LatentFormat:
    """A family's latent space: raw VAE latents times `scale_factor` are what the UNet sees."""

    scale_factor = 1.0
    latent_channels = 4
    latent_dimensions = 2
    latent_rgb_factors: Any = None
    latent_rgb_factors_bias: Any = None
    taesd_decoder_name: str | None = None

    def process_in(self, latent: Tensor) -> Tensor:
        return latent * self.scale_factor

    def process_out(self, latent: Tensor) -> Tensor:
        return latent / self.scale_factor


class SD15(LatentFormat):
    scale_factor = SD1_LATENT.scale
    latent_rgb_factors = [list(row) for row in SD1_LATENT.rgb_factors]
    taesd_decoder_name = "taesd_decoder"


class SDXL(LatentFormat):
    scale_factor = SDXL_LATENT.scale
    latent_rgb_factors = [list(row) for row in SDXL_LATENT.rgb_factors]
    latent_rgb_factors_bias = list(SDXL_LATENT.rgb_bias)
    taesd_decoder_name = "taesdxl_decoder"


class SD_X4(LatentFormat):  # noqa: N801 - ComfyUI's class name
    scale_factor = SD_X4_LATENT.scale
    latent_rgb_factors = [list(row) for row in SD_X4_LATENT.rgb_factors]


class SDXL_Playground_2_5(SDXL):  # noqa: N801 - ComfyUI's class name
    def process_in(self, latent: Tensor) -> Tensor:
        raise NotImplementedError("Playground 2.5 latents are not supported by Loom")


def for_family(family: str) -> LatentFormat:
    """The format object of a Loom model family ("sd1", "sd2", "sdxl", "sd_x4" ...)."""
    if family not in LATENT_FORMATS:
        raise ValueError(f"no latent format for model family {family!r}")
    kinds: dict[Any, type[LatentFormat]] = {SDXL_LATENT: SDXL, SD_X4_LATENT: SD_X4}
    return kinds.get(LATENT_FORMATS[family], SD15)()


def __getattr__(name: str) -> Any:
    """Other families' formats (SD3, Flux, video ...) exist in ComfyUI but not in Loom."""
    from loom_internals import unavailable
    if name[:1].isupper():
        return unavailable(f"comfy.latent_formats.{name}")
    raise AttributeError(name)



