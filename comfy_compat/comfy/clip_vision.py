"""ComfyUI's `comfy.clip_vision` for custom-node packs: `load` and `clip_preprocess` over Loom's
CLIP vision model (whose `encode_image` gives ComfyUI's output fields)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from engine.comfy_host import HOST
from engine.diffusion.checkpoints.state_files import open_state_file
from engine.diffusion.memory.model_manager import ModelKey
from engine.diffusion.networks.clip_vision import (
    ClipVisionModel,
    ClipVisionOutput,
    load_clip_vision,
)
from engine.diffusion.networks.clip_vision import clip_preprocess as loom_preprocess

Output = ClipVisionOutput
__all__ = ["ClipVisionModel", "Output", "clip_preprocess", "load"]


def load(ckpt_path: str) -> ClipVisionModel:
    models = HOST.require_services("comfy.clip_vision.load").model_manager
    path = Path(ckpt_path)
    return models.load(ModelKey.for_file(path, "clip_vision", models.policy),
                       lambda: load_clip_vision(
                           open_state_file(path, allow_pickle=models.allow_pickle).tensors,
                           dtype=models.policy.text_dtype, device=models.policy.offload_device))


def clip_preprocess(image: Tensor, size: int = 224, mean: Any = None, std: Any = None,
                    crop: bool = True) -> Tensor:
    if mean is not None or std is not None:
        raise NotImplementedError("clip_preprocess with custom mean/std: Loom normalises with "
                                  "CLIP's own constants")
    return loom_preprocess(image, size, "center" if crop else "none")
