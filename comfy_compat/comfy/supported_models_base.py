"""ComfyUI's `comfy.supported_models_base` for custom-node packs: the model config packs read
(`model.model.model_config.unet_config` ...), from Loom's UNet config."""

from __future__ import annotations

import dataclasses
from typing import Any

from engine.diffusion.patches.model_handle import ModelHandle


class BASE:
    """Base of ComfyUI's per-architecture configs (packs only subclass or read it)."""

    unet_config: dict[str, Any] = {}
    sampling_settings: dict[str, Any] = {}
    latent_format: Any = None
    manual_cast_dtype = None


class ModelConfig(BASE):
    """The config of one loaded model."""

    def __init__(self, handle: ModelHandle) -> None:
        self.unet_config = dataclasses.asdict(handle.config)
        from comfy.latent_formats import for_family
        self.latent_format = type(for_family(handle.family))
        self.sampling_settings = {"prediction": handle.sampling.prediction}
        self.family = handle.family

    def __repr__(self) -> str:
        return f"<model config {self.family}>"
