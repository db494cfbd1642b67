"""ComfyUI's `comfy.comfy_types`: the IO type names and typing helpers classic nodes use."""

from comfy.comfy_types.node_typing import IO, ComfyNodeABC, InputTypeDict

__all__ = ["IO", "ComfyNodeABC", "InputTypeDict"]
