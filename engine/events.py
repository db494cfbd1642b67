"""The interface through which the executor reports a run; the server and the CLI implement it.

Event names and payloads are ComfyUI's WebSocket messages (see shared/compat/API.md):
execution_start, execution_cached, executing, progress, executed, execution_success,
execution_error, execution_interrupted."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


def timestamp_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class NodeLineage:
    """Where a node an expansion added comes from: the node that expanded (`parent_node`), the
    prompt node it descends from (`real_node_id`) and the node the editor shows its progress
    on (`display_node`); ComfyUI's meta fields, by those names."""

    node_id: str
    display_node: str
    parent_node: str
    real_node_id: str

    def meta(self) -> dict[str, str]:
        return {"node_id": self.node_id, "display_node": self.display_node,
                "parent_node": self.parent_node, "real_node_id": self.real_node_id}


class ExecutionListener:
    """Receives a prompt's events. The default implementation ignores them."""

    def event(self, name: str, data: dict[str, Any]) -> None:
        """A protocol message: `name` is the ComfyUI message type, `data` its payload."""

    def preview(self, prompt_id: str, node_id: str, image: Any) -> None:
        """A live preview image (PIL image) from a node that reports progress."""

    def text(self, prompt_id: str, node_id: str, text: str) -> None:
        """Text a running node shows on itself (ComfyUI's binary `progress_text` message)."""

    def node_finished(self, prompt_id: str, node_id: str, seconds: float, cached: bool) -> None:
        """Per-node wall time (0 for cached nodes), for timing displays and history."""

    def node_added(self, prompt_id: str, lineage: NodeLineage) -> None:
        """A node an expansion added to the running prompt (engine/expansion.py): where the
        editor shows it, before it runs."""

    def nodes_cached(self, prompt_id: str, node_ids: list[str]) -> None:
        """Nodes answered from the cache, all at once (right after their `execution_cached`);
        by default each is a node_finished taking 0 seconds."""
        for node_id in node_ids:
            self.node_finished(prompt_id, node_id, 0.0, True)


class RecordingListener(ExecutionListener):
    """Keeps every event in order; used by tests and by history."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.previews: list[tuple[str, Any]] = []
        self.texts: list[tuple[str, str]] = []
        self.timings: dict[str, tuple[float, bool]] = {}

    def event(self, name: str, data: dict[str, Any]) -> None:
        self.events.append((name, data))

    def preview(self, prompt_id: str, node_id: str, image: Any) -> None:
        self.previews.append((node_id, image))

    def text(self, prompt_id: str, node_id: str, text: str) -> None:
        self.texts.append((node_id, text))

    def node_finished(self, prompt_id: str, node_id: str, seconds: float, cached: bool) -> None:
        self.timings[node_id] = (seconds, cached)

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def executed_nodes(self) -> list[str]:
        """Node ids that actually ran (got an `executing` event), in order."""
        return [data["node"] for name, data in self.events
                if name == "executing" and data.get("node") is not None]
