"""ComfyUI's `comfy.controlnet` for custom-node packs: `load_controlnet` over Loom's loader.
ComfyUI's control classes (ControlBase, ControlNet, T2IAdapter ...) are stand-ins: packs may
subclass them at import, and using them raises a clear error."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

from loom_internals import unavailable

from engine.comfy_host import HOST, from_pack
from engine.diffusion.checkpoints.controlnet_loader import load_control_model
from engine.diffusion.checkpoints.state_files import open_state_file
from engine.diffusion.memory.model_manager import ModelKey


class StrengthType(enum.Enum):
    CONSTANT = 1
    LINEAR_UP = 2


ControlBase = unavailable("comfy.controlnet.ControlBase")
ControlNet = unavailable("comfy.controlnet.ControlNet")
ControlLora = unavailable("comfy.controlnet.ControlLora")
ControlNetSD35 = unavailable("comfy.controlnet.ControlNetSD35")
T2IAdapter = unavailable("comfy.controlnet.T2IAdapter")


def load_controlnet(ckpt_path: str, model: Any = None, model_options: Any = None) -> Any:
    """A CONTROL_NET from a file (original or diffusers layout, T2I-Adapters included)."""
    models = HOST.require_services("comfy.controlnet.load_controlnet").model_manager
    path = Path(ckpt_path)
    base = from_pack(model) if model is not None else None
    options = (models.policy,) if base is None else (models.policy, base)
    return models.load(ModelKey.for_file(path, "controlnet", *options), lambda: load_control_model(
        open_state_file(path, allow_pickle=models.allow_pickle), models.policy, base))


def __getattr__(name: str) -> Any:
    if name[:1].isupper() or name.startswith("load_"):
        return unavailable(f"comfy.controlnet.{name}")
    raise AttributeError(name)
