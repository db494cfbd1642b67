"""ComfyUI's `comfy_execution.graph` for custom-node packs: ExecutionBlocker, the value a node
returns to stop the nodes that consume that output."""

from __future__ import annotations

from typing import Any

from loom_internals import unavailable

DynamicPrompt = unavailable("comfy_execution.graph.DynamicPrompt")
ExecutionList = unavailable("comfy_execution.graph.ExecutionList")
TopologicalSort = unavailable("comfy_execution.graph.TopologicalSort")


class ExecutionBlocker:
    """An output value meaning "do not run what consumes me"; `message` None blocks silently,
    otherwise the consumer fails with it. Pack nodes (classic and V3) honour it; Loom's own
    nodes do not know it and fail on it as on any wrong value."""

    __loom_execution_blocker__ = True

    def __init__(self, message: str | None) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"ExecutionBlocker({self.message!r})"


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
