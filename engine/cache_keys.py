"""Cache keys, after ComfyUI's input-signature design: a node's key is a digest of its class and
version, its literal inputs, its fingerprint (ComfyUI's IS_CHANGED) and, for each linked input,
the identity of the upstream output it reads.

An output's identity is its content when that can be told cheaply, else the key of the node
that made it. Content identities give early cutoff: a node that ran again and produced the same
value leaves its consumers' keys, and so their cached results, as they were."""

from __future__ import annotations

import hashlib
from typing import Any

from engine.digest import content_digest, literal_items, small_scalars, stable_key
from engine.graph import Prompt, PromptNode
from engine.node import Node
from engine.registry import NodeRegistry

LinkedInput = tuple[str, str, int]  # (input name, source node id, source output slot)


class NodeFacts:
    """What running one prompt node needs to know, worked out once and kept while the node
    stays the same, across prompts too."""

    __slots__ = ("node", "node_type", "schema", "links", "lazy", "static", "fingerprinted",
                 "simple", "literal_kwargs", "link_kwargs", "raw_links")

    def __init__(self, node: PromptNode, node_type: type[Node]) -> None:
        schema = node_type.schema
        self.node = node
        self.node_type = node_type
        self.schema = schema
        self.links: tuple[LinkedInput, ...] = tuple(
            (name, src, slot) for name, (src, slot) in sorted(node.links.items()))
        self.lazy = schema.lazy_inputs
        # the key's part that only the node itself decides
        self.static = repr((node.class_type, schema.version, literal_items(node.literals)))
        self.fingerprinted = node_type.fingerprint is not Node.fingerprint
        declared = schema.declares
        # Only declared inputs reach the node (editor files can carry extras, e.g. "upload").
        self.literal_kwargs = {name: value for name, value in node.literals.items()
                               if declared(name)}
        self.link_kwargs = tuple(link for link in self.links if declared(link[0]))
        # inputs given the link itself, [source id, slot], after the source ran (ComfyUI's
        # "rawLink" option: loop nodes hand links on to the graphs they expand into)
        self.raw_links = frozenset(spec.name for spec in schema.inputs
                                   if spec.options.get("rawLink") is True)
        # one call with one value per input: no lazy, hidden, list or raw-link inputs
        self.simple = not (self.lazy or schema.input_is_list or schema.hidden_inputs
                           or self.raw_links)


class CacheKeys:
    """The facts and keys of prompt nodes, remembered per node id from prompt to prompt: a node
    whose facts, upstream identities and fingerprint are unchanged keeps its key unhashed."""

    def __init__(self, registry: NodeRegistry) -> None:
        self.registry = registry
        self._facts: dict[str, NodeFacts] = {}
        self._keys: dict[str, tuple[NodeFacts, tuple[Any, ...], Any, str]] = {}

    def facts(self, node: PromptNode) -> NodeFacts:
        """The node's facts (its class must be registered: the prompt was validated)."""
        known = self._facts.get(node.node_id)
        if known is not None and (known.node is node or known.node == node):
            return known
        node_type = self.registry.get(node.class_type)
        if node_type is None:
            raise KeyError(f"node {node.node_id}: class {node.class_type!r} is not registered; "
                           f"validate the prompt before running it")
        facts = self._facts[node.node_id] = NodeFacts(node, node_type)
        return facts

    def key(self, facts: NodeFacts, upstream: tuple[Any, ...], fingerprint: Any) -> str:
        """The key of a node with these facts, upstream identities and fingerprint."""
        node_id = facts.node.node_id
        known = self._keys.get(node_id)
        if (known is not None and known[0] is facts and known[1] == upstream
                and known[2] == fingerprint):
            return known[3]
        key = hashlib.blake2b(f"{facts.static}|{fingerprint!r}|{upstream!r}".encode(),
                              digest_size=16).hexdigest()
        self._keys[node_id] = (facts, upstream, fingerprint, key)
        return key

    def forget(self, keep: set[str]) -> None:
        """Drop what is remembered of nodes outside `keep` (the latest prompt's)."""
        for memo in (self._facts, self._keys):
            if not memo.keys() <= keep:
                for node_id in [n for n in memo if n not in keep]:
                    del memo[node_id]


def output_identity(values: list[Any], key: str, slot: int) -> Any:
    """What downstream keys see of an output: its content when it can be told cheaply
    (that is what makes early cutoff work), else the producing node's key."""
    scalars = small_scalars(values)
    if scalars is not None:
        return ("s", scalars)
    digest = content_digest(values)
    return ("v", digest) if digest is not None else ("k", key, slot)


def structural_key(prompt: Prompt, node_id: str, rank: dict[str, int],
                   registry: NodeRegistry, known: dict[str, str]) -> str:
    """A key from the graph alone (no output contents), for a lazy input not evaluated yet.
    `known` holds those worked out so far (each node's once, from its sources'); `rank` is each
    node's place in the run's order."""
    unknown, stack = set(), [node_id]
    while stack:
        current = stack.pop()
        if current not in unknown and current not in known:
            unknown.add(current)
            stack.extend(src for src, _ in prompt.nodes[current].links.values())
    for current in sorted(unknown, key=rank.__getitem__):
        node = prompt.nodes[current]
        links = tuple((name, known[src], slot) for name, (src, slot) in sorted(node.links.items()))
        node_type = registry.get(node.class_type)
        version = node_type.schema.version if node_type is not None else None
        known[current] = stable_key((node.class_type, version, node.literals, links))
    return known[node_id]
