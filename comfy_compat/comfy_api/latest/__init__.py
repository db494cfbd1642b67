"""ComfyUI's `comfy_api.latest`: `io` (ComfyNode, Schema, typed inputs and outputs, Hidden,
NodeOutput), `ui` (preview helpers) and ComfyExtension, whose nodes Loom registers like its own
(see io.ComfyNode.__loom_node__)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from loom_internals import unavailable

from comfy_api.latest import io, ui

Input = unavailable("comfy_api.latest.Input")
InputImpl = unavailable("comfy_api.latest.InputImpl")
Types = unavailable("comfy_api.latest.Types")
ComfyAPI = unavailable("comfy_api.latest.ComfyAPI")
ComfyAPISync = unavailable("comfy_api.latest.ComfyAPISync")


class ComfyExtension(ABC):
    """What a pack's `comfy_entrypoint()` returns: its V3 node classes."""

    async def on_load(self) -> None:  # noqa: B027 - optional hook, ComfyUI's default is empty
        """Called once before get_node_list."""

    @abstractmethod
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        """The node classes this extension registers."""


__all__ = ["ComfyAPI", "ComfyExtension", "Input", "InputImpl", "Types", "io", "ui"]

