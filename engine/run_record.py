"""What a run leaves for the next run of the same graph, so that the editor's re-runs cost
little more than their events.

A key is a function of a node, its fingerprint and the entries its inputs came from. While the
cache holds the same entries as when the run ended (its version is unchanged), a node that is
the same object (or equal), with the same fingerprint, whose sources all kept their keys, keeps
its recorded key: nothing need be hashed. When every node does (the same prompt again), the
whole run is replayed from the record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from engine.cache import OutputCache
from engine.graph import Prompt, PromptNode


@dataclass(frozen=True)
class RunRecord:
    """A run that resolved every node, with no node lazy, non-idempotent or always changed."""

    nodes: dict[str, PromptNode]
    outputs: tuple[str, ...]
    reachable: set[str]
    node_ids: tuple[str, ...]  # in order
    keys: tuple[str, ...]
    shown: tuple[str, ...]  # output nodes with a UI dict
    fingerprints: dict[str, str]  # node id -> repr of its fingerprint
    cache_version: int = -1  # the cache's once the run ended
    # node id -> key; made from node_ids and keys when not given (a copy of the record gives it)
    key_of: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.key_of:
            object.__setattr__(self, "key_of", dict(zip(self.node_ids, self.keys, strict=True)))

    def holds(self, cache: OutputCache) -> bool:
        """Whether the cache is as the run left it."""
        return self.cache_version == cache.version

    def repeated_by(self, prompt: Prompt, outputs: list[str]) -> bool:
        """Whether `prompt` with these outputs is the recorded one again (validation may have
        said so already: an edit of the recorded nodes that changed none)."""
        edit = prompt.edit
        return self.outputs == tuple(outputs) and (
            (edit is not None and edit.before is self.nodes and not edit.changed)
            or self.nodes == prompt.nodes)

    def unchanged(self, node: PromptNode) -> bool:
        """Whether the node is as recorded (its fingerprint and sources aside)."""
        before = self.nodes.get(node.node_id)
        return before is node or (before is not None and before == node)

    def stale(self, prompt: Prompt, order: list[str], rank: dict[str, int],
              changed: frozenset[str], same_fingerprint: Callable[[str], bool]) -> set[str]:
        """The nodes of `prompt`'s run (`order`, `rank` its positions) that cannot keep their
        recorded key: those `changed` since the recorded prompt, those the run did not key, those
        whose fingerprint changed (asked in order, only of nodes still clean) and everything
        downstream of them."""
        key_of = self.key_of
        stale = prompt.downstream(order, rank, {node_id for node_id in order
                                                if node_id in changed or node_id not in key_of})
        for node_id in sorted((n for n in self.fingerprints if n in rank and n not in stale),
                              key=rank.__getitem__):
            if node_id not in stale and not same_fingerprint(node_id):
                stale = prompt.downstream(order, rank, stale | {node_id})
        return stale
