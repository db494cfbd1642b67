"""ComfyUI's `comfy_execution.graph` for custom-node packs: ExecutionBlocker, the value a node
returns to stop the nodes that consume that output, and DynamicPrompt, the running prompt with
the nodes expansions added (what a DYNPROMPT hidden input receives)."""

from __future__ import annotations

from typing import Any

from loom_internals import unavailable

from comfy_execution.graph_utils import ExecutionBlocker
from engine.expansion import DynamicPrompt, NodeNotFoundError

ExecutionList = unavailable("comfy_execution.graph.ExecutionList")
TopologicalSort = unavailable("comfy_execution.graph.TopologicalSort")

__all__ = ["DynamicPrompt", "ExecutionBlocker", "ExecutionList", "NodeNotFoundError",
           "TopologicalSort", "get_input_info"]


def get_input_info(class_def: Any, input_name: str, valid_inputs: Any = None) -> Any:
    """(type, section, options) of an input declared by a classic node class."""
    declared = valid_inputs or class_def.INPUT_TYPES()
    for section in ("required", "optional", "hidden"):
        entries = declared.get(section) or {}
        if input_name in entries:
            spec = entries[input_name]
            if section == "hidden":
                return spec, section, None
            options = spec[1] if len(spec) > 1 else None
            kind = "COMBO" if isinstance(spec[0], (list, tuple)) else spec[0]
            return kind, section, options
    return None, None, None
