"""ComfyUI's `comfy_execution.graph_utils` for custom-node packs: GraphBuilder, the helper packs
use to describe the nodes a node expands into (`{"result": ..., "expand": graph}`)."""

from __future__ import annotations

from typing import Any


def is_link(obj: Any) -> bool:
    """A link is [node_id (str), output index (int)]."""
    return (isinstance(obj, (list, tuple)) and len(obj) == 2 and isinstance(obj[0], str)
            and isinstance(obj[1], int))


class GraphNode:
    """One node of a graph being built."""

    def __init__(self, node_id: str, class_type: str, inputs: dict[str, Any]) -> None:
        self.id = node_id
        self.class_type = class_type
        self.inputs = inputs
        self.override_display_id: str | None = None

    def out(self, index: int) -> list[Any]:
        return [self.id, index]

    def set_input(self, key: str, value: Any) -> None:
        if value is None:
            self.inputs.pop(key, None)
        else:
            self.inputs[key] = value

    def get_id(self) -> str:
        return self.id

    def set_override_display_id(self, override_display_id: str) -> None:
        self.override_display_id = override_display_id

    def serialize(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"class_type": self.class_type, "inputs": self.inputs}
        if self.override_display_id is not None:
            entry["override_display_id"] = self.override_display_id
        return entry


class GraphBuilder:
    """Builds an API-format graph; node ids are prefixed so expansions do not collide."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix if prefix is not None else ""
        self.nodes: dict[str, GraphNode] = {}
        self.id_gen = 1

    def node(self, class_type: str, id: str | None = None, **kwargs: Any) -> GraphNode:
        node_id = str(self.id_gen) if id is None else str(id)
        if id is None:
            self.id_gen += 1
        node_id = self.prefix + node_id
        if node_id in self.nodes:
            return self.nodes[node_id]
        found = GraphNode(node_id, class_type, kwargs)
        self.nodes[node_id] = found
        return found

    def lookup_node(self, id: str) -> GraphNode | None:
        return self.nodes.get(self.prefix + str(id))

    def remove_node(self, id: str) -> None:
        self.nodes.pop(self.prefix + str(id), None)

    def finalize(self) -> dict[str, Any]:
        return {node_id: node.serialize() for node_id, node in self.nodes.items()}
