"""A prompt as a graph: parsed links, the part the outputs need, and the order to run it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx


def is_link(value: Any) -> bool:
    """An API-format link: ["<node id>", <output index>]."""
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and isinstance(value[0], (str, int)) and not isinstance(value[0], bool)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


@dataclass(frozen=True)
class PromptNode:
    """One node of a prompt: literal inputs and links kept apart."""

    node_id: str
    class_type: str
    literals: dict[str, Any]
    links: dict[str, tuple[str, int]]
    title: str | None = None


@dataclass
class Prompt:
    """A parsed API-format prompt."""

    nodes: dict[str, PromptNode]
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, api: Mapping[str, Any]) -> Prompt:
        nodes = {}
        for node_id, body in api.items():
            node_id = str(node_id)
            inputs = body.get("inputs", {}) if isinstance(body, Mapping) else {}
            literals, links = {}, {}
            for name, value in (inputs.items() if isinstance(inputs, Mapping) else ()):
                if is_link(value):
                    links[name] = (str(value[0]), int(value[1]))
                else:
                    literals[name] = value
            meta = body.get("_meta") if isinstance(body, Mapping) else None
            title = meta.get("title") if isinstance(meta, Mapping) else None
            class_type = body.get("class_type") if isinstance(body, Mapping) else None
            nodes[node_id] = PromptNode(node_id, class_type, literals, links, title)
        return cls(nodes=nodes, raw=dict(api))

    def digraph(self, *, skip_inputs: Mapping[str, Iterable[str]] | None = None) -> nx.DiGraph:
        """Edges upstream -> downstream for every link to an existing node."""
        graph = nx.DiGraph()
        graph.add_nodes_from(self.nodes)
        for node in self.nodes.values():
            skipped = set(skip_inputs.get(node.node_id, ())) if skip_inputs else set()
            for name, (source, _) in node.links.items():
                if source in self.nodes and name not in skipped:
                    graph.add_edge(source, node.node_id)
        return graph

    def required_nodes(self, outputs: Iterable[str]) -> set[str]:
        """The outputs and every node they transitively read from."""
        needed: set[str] = set()
        stack = [node_id for node_id in outputs if node_id in self.nodes]
        while stack:
            node_id = stack.pop()
            if node_id in needed:
                continue
            needed.add(node_id)
            stack.extend(src for src, _ in self.nodes[node_id].links.values()
                         if src in self.nodes and src not in needed)
        return needed


def find_cycle(graph: nx.DiGraph) -> list[str] | None:
    """One cycle as a node path (first node repeated at the end), or None."""
    try:
        edges = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return None
    path = [edges[0][0]] + [dst for _, dst in edges]
    return [str(node) for node in path]


def execution_order(graph: nx.DiGraph, nodes: Iterable[str]) -> list[str]:
    """Topological order of `nodes`, ties broken by node id so runs are reproducible."""
    sub = graph.subgraph(nodes)
    return list(nx.lexicographical_topological_sort(sub, key=_id_sort_key))


def _id_sort_key(node_id: str) -> tuple[int, Any]:
    return (0, int(node_id)) if node_id.isdigit() else (1, node_id)
