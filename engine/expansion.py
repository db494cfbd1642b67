"""Node expansion, as ComfyUI defines it: a node may return, beside its results, a graph of new
nodes (`NodeResult.expand`, API format). The engine then

1. adds those nodes to the running prompt, each remembering its parent (the expanding node),
   its real node (the prompt node it descends from, through nested expansions) and its display
   node (where the editor shows its progress: the parent's display node, or the node named by
   `override_display_id`);
2. runs the new output nodes and the nodes the results link to (`ExpansionLink`), with the
   usual caching: an expanded node's key is made from its inputs like any node's, so an
   expansion that repeats work finds it in the cache. Expansions may pass any value as a
   literal input (a loop hands its tensors on that way): such a value enters the key by its
   content digest, or, where it has none (a model), makes the node's key unique to the run;
3. then gives the expanding node its outputs: every link replaced by the values of the output
   it names, and caches them under the expanding node's own key, so a later prompt with the
   same inputs reuses them without expanding again.

New nodes may expand in turn (loops do, once per iteration): the executor keeps the waiting
parents on its work stack, so nesting depth costs no recursion. New nodes are not validated
(as in ComfyUI); their classes must be registered and their ids new to the prompt, which
`GraphBuilder` ensures by prefixing ids with "<parent id>.<call index>.<graph index>.".
A failure inside an expansion is reported on the real node, naming the expanded node."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import networkx as nx

from engine.cache import CacheEntry
from engine.cache_keys import output_identity
from engine.digest import content_digest
from engine.events import NodeLineage
from engine.graph import CycleError, Prompt, PromptNode, find_cycle, parse_node
from engine.node import ExpansionLink
from engine.node_call import Graphs, Outputs
from engine.registry import NodeRegistry

_PLAIN = (str, int, float, bool, type(None))  # literal types a key can take as they are


class ExpansionError(ValueError):
    """A node returned an expansion graph that cannot be run."""


class NodeNotFoundError(KeyError):
    """A DynamicPrompt was asked for a node the running prompt does not have."""


def _parse_expanded(node_id: str, body: Mapping[str, Any]) -> PromptNode:
    """A node of an expansion. As in ComfyUI, only a list [str id, int slot] is a link there:
    a loop hands values on as literals, and a list of two ints is such a value."""
    node = parse_node(node_id, body)
    inputs = body.get("inputs") or {}
    for name in [n for n, value in inputs.items() if n in node.links
                 and not (isinstance(value, list) and isinstance(value[0], str))]:
        del node.links[name]
        node.literals[name] = inputs[name]
    return node


class DynamicPrompt:
    """The running prompt as a DYNPROMPT hidden input sees it (ComfyUI's DynamicPrompt): the
    prompt's nodes and those expansions added, each as its API-format dict."""

    def __init__(self, original: Mapping[str, Any]) -> None:
        self.original = original
        self.added: dict[str, Mapping[str, Any]] = {}
        self.parents: dict[str, str] = {}
        self.real: dict[str, str] = {}
        self.display: dict[str, str] = {}

    def get_node(self, node_id: str) -> Mapping[str, Any]:
        node = self.added.get(node_id) or self.original.get(node_id)
        if node is None:
            raise NodeNotFoundError(f"node {node_id!r} is not in the running prompt")
        return node

    def has_node(self, node_id: str) -> bool:
        return node_id in self.added or node_id in self.original

    def all_node_ids(self) -> set[str]:
        return set(self.original) | set(self.added)

    def get_original_prompt(self) -> Mapping[str, Any]:
        return self.original

    def add_ephemeral_node(self, node_id: str, node_info: Mapping[str, Any], parent_id: str,
                           display_id: str) -> None:
        """Record a node an expansion added (ids of display and real nodes resolved now)."""
        self.added[node_id] = node_info
        self.parents[node_id] = parent_id
        self.real[node_id] = self.real.get(parent_id, parent_id)
        self.display[node_id] = self.display.get(display_id, display_id)

    def get_real_node_id(self, node_id: str) -> str:
        """The prompt node `node_id` descends from (itself for a prompt node)."""
        return self.real.get(node_id, node_id)

    def get_parent_node_id(self, node_id: str) -> str | None:
        return self.parents.get(node_id)

    def get_display_node_id(self, node_id: str) -> str:
        return self.display.get(node_id, node_id)


@dataclass
class PendingExpansion:
    """An expanding node waiting for its expansion: its key, outputs (with links) and UI."""

    key: str
    outputs: Outputs
    ui: dict[str, Any] | None
    targets: list[str]


class Expansions:
    """The expansions of one prompt run: the prompt with the nodes they added, and the nodes
    waiting for theirs."""

    def __init__(self, prompt: Prompt, registry: NodeRegistry) -> None:
        self.prompt = prompt
        self.registry = registry
        self.dynamic = DynamicPrompt(prompt.raw)
        self.pending: dict[str, PendingExpansion] = {}
        # per new node with literal values that are not plain scalars, what the key sees of them
        self.opaque: dict[str, str] = {}
        self.added: list[str] = []  # the nodes the latest expansion added
        self._own_copy = False

    def expand(self, parent_id: str, pending: PendingExpansion, graphs: Graphs,
               rank: dict[str, int]) -> list[str]:
        """Add the nodes of `graphs` (ranked after every node of the run); the nodes to run
        before the parent can finish (its result links' sources and the new output nodes)."""
        added = {}
        for graph in graphs:
            added.update(self._parse(parent_id, graph, added))
        self._check_links(parent_id, added, pending.outputs)
        if not self._own_copy:  # the caller's prompt stays as it was
            self.prompt = Prompt(nodes=dict(self.prompt.nodes), raw=self.prompt.raw)
            self._own_copy = True
        self.prompt.nodes.update(added)
        self._rank(added, rank)
        pending.targets = self._targets(added, pending.outputs)
        self.pending[parent_id] = pending
        self.added = list(added)
        return pending.targets

    def lineage(self, node_id: str) -> NodeLineage:
        dynamic = self.dynamic
        return NodeLineage(node_id, dynamic.get_display_node_id(node_id),
                           dynamic.parents[node_id], dynamic.get_real_node_id(node_id))

    def finish(self, parent_id: str, resolved: Mapping[str, CacheEntry]
               ) -> tuple[str, CacheEntry]:
        """The parent's key and cache entry: its outputs with each link replaced by the
        values it names."""
        pending = self.pending.pop(parent_id)
        outputs = [[item for value in values for item in (
            resolved[value.node_id].outputs[value.slot] if isinstance(value, ExpansionLink)
            else (value,))] for values in pending.outputs]
        identities = tuple(output_identity(values, pending.key, slot)
                           for slot, values in enumerate(outputs))
        return pending.key, CacheEntry(outputs, identities, pending.ui)

    def reported(self, node_id: str, exc: BaseException) -> tuple[str, str]:
        """Where a node's failure is reported (its prompt node, as ComfyUI does) and the
        message (naming the expanded node that failed, when it is one)."""
        real = self.dynamic.get_real_node_id(node_id)
        if real == node_id:
            return node_id, str(exc)
        class_type = self.prompt.nodes[node_id].class_type
        return real, f"node {node_id} ({class_type}), which node {real} expanded into, " \
                     f"failed: {exc}"

    # -- reading a graph ----------------------------------------------------------------------
    def _parse(self, parent_id: str, graph: Any, added: Mapping[str, PromptNode]
               ) -> dict[str, PromptNode]:
        where = f"node {parent_id} ({self.prompt.nodes[parent_id].class_type})"
        if not isinstance(graph, Mapping):
            raise ExpansionError(f"{where} returned an 'expand' of type {type(graph).__name__}; "
                                 f"return a dict of node id -> {{'class_type', 'inputs'}}, e.g. "
                                 f"GraphBuilder().finalize()")
        nodes = {}
        for raw_id, body in graph.items():
            node_id = str(raw_id)
            class_type = body.get("class_type") if isinstance(body, Mapping) else None
            if not isinstance(class_type, str) or self.registry.get(class_type) is None:
                raise ExpansionError(f"{where} expanded into node {node_id!r} of class "
                                     f"{class_type!r}, which is not a registered node class; "
                                     f"install the pack that provides it")
            if node_id in self.prompt.nodes or node_id in added or node_id in nodes:
                raise ExpansionError(f"{where} expanded into node {node_id!r}, an id the prompt "
                                     f"already has; build the graph with GraphBuilder, which "
                                     f"makes ids unique per expanding node")
            nodes[node_id] = node = _parse_expanded(node_id, body)
            if not all(type(value) in _PLAIN for value in node.literals.values()):
                self.opaque[node_id] = content_digest(node.literals) or uuid.uuid4().hex
            display = body.get("override_display_id")
            self.dynamic.add_ephemeral_node(node_id, body, parent_id,
                                            parent_id if display is None else str(display))
        return nodes

    def _check_links(self, parent_id: str, added: Mapping[str, PromptNode],
                     outputs: Outputs) -> None:
        known = self.prompt.nodes
        for node in added.values():
            for name, (src, _) in node.links.items():
                if src not in added and src not in known:
                    raise ExpansionError(f"node {parent_id} expanded into node {node.node_id}, "
                                         f"whose input {name!r} links to node {src!r}, which "
                                         f"neither the prompt nor the expansion has")
                if src == parent_id or src in self.pending:
                    raise ExpansionError(f"node {parent_id} expanded into node {node.node_id}, "
                                         f"whose input {name!r} links to node {src!r}, which "
                                         f"waits for this expansion to finish; link to the "
                                         f"nodes it read instead")
        for slot, values in enumerate(outputs):
            for value in values:
                if not isinstance(value, ExpansionLink):
                    continue
                if value.node_id not in added and value.node_id not in known:
                    raise ExpansionError(f"node {parent_id}'s result {slot} links to node "
                                         f"{value.node_id!r}, which its expansion does not have")
                if value.node_id == parent_id or value.node_id in self.pending:
                    raise ExpansionError(f"node {parent_id}'s result {slot} links to node "
                                         f"{value.node_id!r}, which waits for this expansion; "
                                         f"link to a node of the expansion")

    def _rank(self, added: Mapping[str, PromptNode], rank: dict[str, int]) -> None:
        """Give the new nodes, and prompt nodes they read that the run had not planned, places
        after every ranked node, in dependency order."""
        nodes = self.prompt.nodes
        group, stack = set(), list(added)
        while stack:
            node_id = stack.pop()
            if node_id not in group and node_id not in rank:
                group.add(node_id)
                stack.extend(src for src, _ in nodes[node_id].links.values())
        graph = nx.DiGraph()
        graph.add_nodes_from(group)
        graph.add_edges_from((src, node_id) for node_id in group
                             for src, _ in nodes[node_id].links.values() if src in group)
        try:
            order = list(nx.topological_sort(graph))
        except nx.NetworkXUnfeasible:
            raise CycleError(find_cycle(graph) or []) from None
        for node_id in order:
            rank[node_id] = len(rank)

    def _targets(self, added: Mapping[str, PromptNode], outputs: Outputs) -> list[str]:
        linked = {value.node_id for values in outputs for value in values
                  if isinstance(value, ExpansionLink)}
        shown = {node_id for node_id, node in added.items()
                 if self.registry.get(node.class_type).schema.output_node}
        return sorted(linked | shown)
