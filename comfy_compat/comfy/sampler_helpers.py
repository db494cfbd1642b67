"""ComfyUI's `comfy.sampler_helpers` for custom-node packs: mask preparation over Loom's."""

from __future__ import annotations

from typing import Any

import torch
from loom_internals import unavailable

from engine.diffusion.sampling.ksampler import prepare_noise_mask

get_models_from_cond = unavailable("comfy.sampler_helpers.get_models_from_cond")
convert_cond = unavailable("comfy.sampler_helpers.convert_cond")
get_additional_models = unavailable("comfy.sampler_helpers.get_additional_models")
prepare_sampling = unavailable("comfy.sampler_helpers.prepare_sampling")
cleanup_models = unavailable("comfy.sampler_helpers.cleanup_models")


def prepare_mask(noise_mask: torch.Tensor, shape: Any, device: Any) -> torch.Tensor:
    """A noise mask resized to the latent's shape, on `device` (ComfyUI's rule)."""
    return prepare_noise_mask(noise_mask, torch.Size(shape), torch.device(device))


def cleanup_additional_models(models: Any) -> None:
    return None
