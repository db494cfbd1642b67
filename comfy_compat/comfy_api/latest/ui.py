"""ComfyUI's `comfy_api.latest.ui`: what a V3 node shows in the editor (NodeOutput(ui=...))."""

from __future__ import annotations

from typing import Any

import torch

from engine.comfy_host import HOST
from nodes.imageio import preview_prefix, save_png_batch


class _UIOutput:
    def as_dict(self) -> dict[str, Any]:
        raise NotImplementedError


class SavedResult(dict):
    def __init__(self, filename: str, subfolder: str, type: Any) -> None:
        super().__init__(filename=filename, subfolder=subfolder,
                         type=getattr(type, "value", type))


class SavedImages(_UIOutput):
    def __init__(self, results: list[Any], is_animated: bool = False) -> None:
        self.results = results
        self.is_animated = is_animated

    def as_dict(self) -> dict[str, Any]:
        return {"images": list(self.results), "animated": (self.is_animated,)}


class PreviewImage(_UIOutput):
    """Images saved to the temp folder and shown on the node."""

    def __init__(self, image: torch.Tensor, animated: bool = False, cls: Any = None,
                 **kwargs: Any) -> None:
        paths = HOST.require_services("ui.PreviewImage").paths
        self.values = save_png_batch(image, paths.temp, preview_prefix(), "temp", 1)
        self.animated = animated

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.values, "animated": (self.animated,)}


class PreviewMask(PreviewImage):
    def __init__(self, mask: torch.Tensor, animated: bool = False, cls: Any = None,
                 **kwargs: Any) -> None:
        image = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).movedim(1, -1)
        super().__init__(image.expand(-1, -1, -1, 3), animated, cls)


class PreviewText(_UIOutput):
    def __init__(self, value: str, **kwargs: Any) -> None:
        self.value = value

    def as_dict(self) -> dict[str, Any]:
        return {"text": (self.value,)}


def __getattr__(name: str) -> Any:
    """Other ComfyUI UI helpers (PreviewAudio, PreviewVideo, PreviewUI3D ...) are not in Loom's
    facade: a node using one fails naming it."""
    if name[:1].isupper():
        from loom_internals import unavailable
        return unavailable(f"comfy_api.latest.ui.{name}")
    raise AttributeError(name)
