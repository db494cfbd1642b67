"""ComfyUI's `comfy.model_base` for custom-node packs: ModelType, and the model classes packs
test MODEL against (`isinstance(model.model, comfy.model_base.SDXL)`), as views over Loom's
ModelHandle. Other architectures ComfyUI has exist here as stand-ins that raise when used."""

from __future__ import annotations

import enum
from typing import Any

import torch

from engine.diffusion.patches.model_handle import ModelHandle


class ModelType(enum.Enum):
    EPS = 1
    V_PREDICTION = 2
    V_PREDICTION_EDM = 3
    STABLE_CASCADE = 4
    EDM = 5
    FLOW = 6
    V_PREDICTION_CONTINUOUS = 7
    FLUX = 8
    IMG_TO_IMG = 9


class BaseModel:
    """`model_patcher.model`: the attributes of ComfyUI's BaseModel packs read."""

    def __init__(self, handle: ModelHandle) -> None:
        self.handle = handle

    @property
    def model_sampling(self) -> Any:
        return self.handle.sampling

    @property
    def latent_format(self) -> Any:
        from comfy.latent_formats import for_family
        return for_family(self.handle.family)

    @property
    def diffusion_model(self) -> torch.nn.Module:
        return self.handle.unet

    @property
    def model_type(self) -> ModelType:
        prediction = self.handle.sampling.prediction
        return ModelType.V_PREDICTION if prediction == "v_prediction" else ModelType.EPS

    @property
    def model_config(self) -> Any:
        from comfy.supported_models_base import ModelConfig
        return ModelConfig(self.handle)

    @property
    def device(self) -> torch.device:
        return self.handle.device

    manual_cast_dtype = None

    def get_dtype(self) -> torch.dtype:
        return self.handle.dtype

    def memory_required(self, input_shape: Any) -> int:
        area = int(input_shape[0]) * int(input_shape[2]) * int(input_shape[3])
        return int(area * torch.finfo(self.handle.dtype).bits // 8 * 0.6 * 1024)

    def is_adm(self) -> bool:
        return self.handle.family in ("sdxl", "sdxl_refiner")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} view of {self.handle.name or self.handle.family}>"


class SDXLRefiner(BaseModel):
    pass


class SDXL(BaseModel):
    pass


def view_for(handle: ModelHandle) -> BaseModel:
    """The BaseModel subclass ComfyUI would have made for this family."""
    return {"sdxl": SDXL, "sdxl_refiner": SDXLRefiner}.get(handle.family, BaseModel)(handle)


def __getattr__(name: str) -> Any:
    from loom_internals import unavailable
    if name[:1].isupper() or name in ("sdxl_pooled", "convert_tensor"):
        return unavailable(f"comfy.model_base.{name}")
    raise AttributeError(name)
