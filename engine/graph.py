"""A prompt as a graph: parsed links, the part the outputs need, and the order to run it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # networkx is imported when a graph is first ordered, not at start-up
    import networkx as nx


def is_link(value: Any) -> bool:
    """An API-format link: ["<node id>", <output index>]."""
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and isinstance(value[0], (str, int)) and not isinstance(value[0], bool)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


@dataclass(slots=True)
class PromptNode:
    """One node of a prompt: literal inputs and links kept apart."""

    node_id: str
    class_type: str
    literals: dict[str, Any]
    links: dict[str, tuple[str, int]]
    title: str | None = None


def parse_node(node_id: str, body: Any) -> PromptNode:
    """One API-format node, its inputs split into literals and links."""
    inputs = body.get("inputs", {}) if isinstance(body, Mapping) else {}
    literals, links = {}, {}
    for name, value in (inputs.items() if isinstance(inputs, Mapping) else ()):
        # is_link, inlined: this loop runs for every input of every node
        if (type(value) is list and len(value) == 2 and type(value[1]) is int
                and type(value[0]) in (str, int)) or is_link(value):
            links[name] = (str(value[0]), value[1])
        else:
            literals[name] = value
    meta = body.get("_meta") if isinstance(body, Mapping) else None
    title = meta.get("title") if isinstance(meta, Mapping) else None
    class_type = body.get("class_type") if isinstance(body, Mapping) else None
    return PromptNode(node_id, class_type, literals, links, title)


class CycleError(ValueError):
    """The nodes to run depend on each other in a loop; `cycle` is the path."""

    def __init__(self, cycle: list[str]) -> None:
        super().__init__("dependency cycle: " + " -> ".join(cycle))
        self.cycle = cycle


@dataclass(frozen=True, eq=False)
class PromptEdit:
    """How a prompt differs from one validated before it (the editor posts the same graph again
    with a widget changed): every node not in `changed` has the body it had in `before`, that
    prompt's nodes; `changed` holds the nodes whose body differs and the new ones."""

    before: dict[str, PromptNode]
    changed: frozenset[str]


@dataclass
class Prompt:
    """A parsed API-format prompt; `edit`, when validation compared it with the prompt before."""

    nodes: dict[str, PromptNode]
    raw: dict[str, Any] = field(default_factory=dict)
    edit: PromptEdit | None = None
    _orders: dict[tuple[str, ...], list[str]] = field(default_factory=dict, repr=False)
    _required: dict[tuple[str, ...], set[str]] = field(default_factory=dict, repr=False)

    def order_for(self, outputs: Iterable[str], planner: GraphPlanner | None = None) -> list[str]:
        """Topological order of everything `outputs` read from (memoised per output set, and
        across prompts of the same structure by `planner`). Raises CycleError naming the loop."""
        key = tuple(outputs)
        order = self._orders.get(key)
        if order is None:
            needed = self.required_nodes(key)
            order = self._orders[key] = (planner.order(self, needed) if planner is not None
                                         else topological_order(self, needed))
        return order

    def structure(self, needed: set[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Which node reads from which, for the nodes in `needed` (literal values left out)."""
        return tuple((node.node_id, tuple(src for src, _ in node.links.values()))
                     for node in self.nodes.values() if node.node_id in needed)

    def adopt_plans(self, other: Prompt) -> None:
        """Take over the orders and required sets worked out for `other`, a prompt with the
        same nodes and links."""
        self._orders.update(other._orders)
        self._required.update(other._required)

    @classmethod
    def parse(cls, api: Mapping[str, Any], known: Mapping[str, PromptNode] | None = None,
              ) -> Prompt:
        """Parse an API prompt; nodes in `known` (by id) are taken as they are."""
        known = known or {}
        nodes = {}
        for node_id, body in api.items():
            node_id = str(node_id)
            nodes[node_id] = known.get(node_id) or parse_node(node_id, body)
        return cls(nodes=nodes, raw=dict(api))

    def digraph(self, among: Iterable[str] | None = None) -> nx.DiGraph:
        """Edges upstream -> downstream for every link between existing nodes (of `among`)."""
        import networkx as nx  # ~300 modules: deferred so servers start faster

        members = self.nodes.keys() if among is None else set(among)
        graph = nx.DiGraph()
        graph.add_nodes_from(node_id for node_id in self.nodes if node_id in members)
        graph.add_edges_from((source, node.node_id)
                             for node in self.nodes.values() if node.node_id in members
                             for source, _ in node.links.values() if source in members)
        return graph

    def required_nodes(self, outputs: Iterable[str]) -> set[str]:
        """The outputs and every node they transitively read from (memoised; do not modify)."""
        key = tuple(outputs)
        needed = self._required.get(key)
        if needed is None:
            needed = self._required[key] = self._collect_required(key)
        return needed

    def downstream(self, order: list[str], rank: dict[str, int], seeds: set[str]) -> set[str]:
        """`seeds` and every node of `order` (a topological order, `rank` its positions) that
        reads from one of them, directly or not: one pass from the earliest seed on."""
        dirty = set(seeds)
        start = min(map(rank.__getitem__, seeds), default=len(order))
        nodes = self.nodes
        for node_id in order[start:]:
            if node_id not in dirty and any(src in dirty for src, _ in
                                            nodes[node_id].links.values()):
                dirty.add(node_id)
        return dirty

    def _collect_required(self, outputs: tuple[str, ...]) -> set[str]:
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


def topological_order(prompt: Prompt, needed: set[str]) -> list[str]:
    """Dependency order of `needed` (networkx); CycleError with the loop's path if none."""
    import networkx as nx

    graph = prompt.digraph(needed)
    try:
        return list(nx.topological_sort(graph))
    except nx.NetworkXUnfeasible:
        raise CycleError(find_cycle(graph) or []) from None


class GraphPlanner:
    """Remembers the order of recently seen graph structures: a workflow queued again with
    other widget values (the common case) skips the graph algorithms."""

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self._orders: OrderedDict[tuple[Any, ...], list[str]] = OrderedDict()

    def order(self, prompt: Prompt, needed: set[str]) -> list[str]:
        signature = prompt.structure(needed)
        order = self._orders.get(signature)
        if order is None:
            order = topological_order(prompt, needed)
            self._orders[signature] = order
            if len(self._orders) > self.capacity:
                self._orders.popitem(last=False)
        else:
            self._orders.move_to_end(signature)
        return order


def find_cycle(graph: nx.DiGraph) -> list[str] | None:
    """One cycle as a node path (first node repeated at the end), or None."""
    import networkx as nx

    try:
        edges = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return None
    path = [edges[0][0]] + [dst for _, dst in edges]
    return [str(node) for node in path]


