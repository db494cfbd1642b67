"""ComfyUI's `comfy_execution.graph_utils` for custom-node packs: GraphBuilder, the helper packs
use to describe the nodes a node expands into (`{"result": ..., "expand": graph}`), and
ExecutionBlocker. Loom runs the expansion itself (engine/expansion.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from engine.comfy_host import GraphPrefix, graph_prefix, set_graph_prefix


def is_link(obj: Any) -> bool:
    """A link is a list [node_id (str), output index (int, or a float as ComfyUI allows)]."""
    return (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], str)
            and isinstance(obj[1], (int, float)))


class ExecutionBlocker:
    """An output value meaning "do not run what consumes me"; `message` None blocks silently,
    otherwise the consumer fails with it. Pack nodes (classic and V3) honour it; Loom's own
    nodes do not know it and fail on it as on any wrong value."""

    __loom_execution_blocker__ = True

    def __init__(self, message: str | None) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"ExecutionBlocker({self.message!r})"


class GraphNode:
    """One node of a graph being built; `out(i)` is a link to its output i."""

    def __init__(self, node_id: str, class_type: str, inputs: dict[str, Any]) -> None:
        self.id = node_id
        self.class_type = class_type
        self.inputs = inputs
        self.override_display_id: str | None = None

    def out(self, index: int) -> list[Any]:
        return [self.id, index]

    def set_input(self, key: str, value: Any) -> None:
        """Set an input (a literal or a link); None removes it."""
        if value is None:
            self.inputs.pop(key, None)
        else:
            self.inputs[key] = value

    def get_input(self, key: str) -> Any:
        return self.inputs.get(key)

    def get_id(self) -> str:
        return self.id

    def set_override_display_id(self, override_display_id: str) -> None:
        """Show this node's progress on another node of the editor (default: the parent)."""
        self.override_display_id = override_display_id

    def serialize(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"class_type": self.class_type, "inputs": self.inputs}
        if self.override_display_id is not None:
            entry["override_display_id"] = self.override_display_id
        return entry


Node = GraphNode  # ComfyUI's name for it


class GraphBuilder:
    """Builds an API-format graph. Node ids get a prefix that makes them unique per expanding
    node and call: by default the running node's "<id>.<call>.<graph>." (see alloc_prefix)."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = GraphBuilder.alloc_prefix() if prefix is None else prefix
        self.nodes: dict[str, GraphNode] = {}
        self.id_gen = 1

    @classmethod
    def set_default_prefix(cls, prefix_root: str, call_index: int, graph_index: int = 0) -> None:
        """Where the next default prefixes start (Loom sets this itself for each node call)."""
        set_graph_prefix(GraphPrefix(str(prefix_root), call_index, graph_index))

    @classmethod
    def alloc_prefix(cls, root: str | None = None, call_index: int | None = None,
                     graph_index: int | None = None) -> str:
        """A fresh "<root>.<call index>.<graph index>." prefix for the running node call."""
        return graph_prefix().allocate(root, call_index, graph_index)

    def node(self, class_type: str, id: str | None = None, **kwargs: Any) -> GraphNode:
        """The node with this id (numbered 1, 2 ... when None), added if it is new."""
        if id is None:
            id = str(self.id_gen)
            self.id_gen += 1
        node_id = self.prefix + str(id)
        found = self.nodes.get(node_id)
        if found is None:
            found = self.nodes[node_id] = GraphNode(node_id, class_type, kwargs)
        return found

    def lookup_node(self, id: str) -> GraphNode | None:
        return self.nodes.get(self.prefix + str(id))

    def remove_node(self, id: str) -> None:
        del self.nodes[self.prefix + str(id)]

    def replace_node_output(self, node_id: str, index: int, new_value: Any) -> None:
        """Every input linked to output `index` of `node_id` gets `new_value` (None: removed)."""
        target = [self.prefix + str(node_id), index]
        for node in self.nodes.values():
            for key in [k for k, v in node.inputs.items() if is_link(v) and list(v) == target]:
                node.set_input(key, new_value)

    def finalize(self) -> dict[str, Any]:
        """The graph in API format, for `{"expand": ...}`."""
        return {node_id: node.serialize() for node_id, node in self.nodes.items()}


def add_graph_prefix(graph: Mapping[str, Any], outputs: Sequence[Any], prefix: str
                     ) -> tuple[dict[str, Any], tuple[Any, ...]]:
    """The graph and result links with `prefix` before every node id (links included)."""
    def moved(value: Any) -> Any:
        return [prefix + value[0], value[1]] if is_link(value) else value

    renamed = {prefix + node_id: {"class_type": body["class_type"],
                                  "inputs": {name: moved(value) for name, value
                                             in body.get("inputs", {}).items()}}
               for node_id, body in graph.items()}
    return renamed, tuple(moved(output) for output in outputs)
