"""What a prompt run ends with: its result, and the failure of a node that stops it."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any

from engine.cache import CacheEntry
from engine.node_call import Outputs


class NodeExecutionError(Exception):
    """A node raised; carries what the execution_error message reports."""

    def __init__(self, node_id: str, class_type: str, exc: BaseException,
                 current_inputs: dict[str, list[Any]]) -> None:
        super().__init__(f"node {node_id} ({class_type}) failed: {type(exc).__name__}: {exc}")
        self.node_id = node_id
        self.class_type = class_type
        self.exc = exc
        self.traceback = traceback.format_exception(type(exc), exc, exc.__traceback__)
        self.current_inputs = current_inputs


@dataclass
class ExecutionResult:
    """How a prompt ended and what it produced."""

    prompt_id: str
    status: str  # "success" | "error" | "interrupted"
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    resolved: dict[str, CacheEntry] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "success"

    @property
    def values(self) -> dict[str, Outputs]:
        """Per node that ran or was cached, its output values (per slot, a list)."""
        return {node_id: entry.outputs for node_id, entry in self.resolved.items()}
