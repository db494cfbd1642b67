"""What a prompt's run takes from earlier runs instead of computing it: the whole previous run
replayed when the prompt repeats it, the recorded keys of nodes that did not change (told by
validation's PromptEdit, else checked node by node), and cache hits announced as one
`execution_cached` event. A part of the executor's `_PromptRun` (engine/executor.py), which
holds the state these methods use: the prompt, the resolved entries, keys and fingerprints."""

from __future__ import annotations

from itertools import repeat
from typing import TYPE_CHECKING, Protocol

from engine.cache import CacheEntry, OutputCache
from engine.cache_keys import NodeFacts
from engine.events import timestamp_ms
from engine.run_record import RunRecord

if TYPE_CHECKING:
    from engine.events import ExecutionListener
    from engine.expansion import Expansions
    from engine.graph import Prompt
    from engine.run_result import ExecutionResult


class _ReuseSource(Protocol):
    """What reuse reads of the executor (engine.executor.Executor provides it; named here so
    this module does not import the executor that imports it)."""

    cache: OutputCache
    _last_run: RunRecord | None


class RunReuse:
    """The reuse half of a prompt's run (mixed into engine.executor._PromptRun, which also
    provides `emit`, `facts`, `_key` and `_fingerprint`)."""

    ex: _ReuseSource
    prompt_id: str
    listener: ExecutionListener
    silent: bool
    expansions: Expansions
    prompt: Prompt
    outputs: list[str]
    resolved: dict[str, CacheEntry]
    keys: dict[str, str]
    used_keys: set[str]
    fingerprints: dict[str, str]
    rank: dict[str, int]
    result: ExecutionResult

    # -- replaying the previous run ---------------------------------------------------------
    def _replayable_record(self) -> tuple[RunRecord, list[CacheEntry]] | None:
        """The previous run's record and the entries it used, if this prompt repeats it and it
        still holds: the same nodes, the same fingerprints, the cache as that run left it."""
        record = self.ex._last_run
        if (record is None or not record.holds(self.ex.cache)
                or not record.repeated_by(self.prompt, self.outputs)
                or not all(map(self._same_fingerprint, record.fingerprints, repeat(record)))):
            return None
        entries = self.ex.cache.get_many(record.keys)
        return (record, entries) if entries is not None else None

    def _replay(self, record: RunRecord, entries: list[CacheEntry]) -> None:
        self.resolved = dict(zip(record.node_ids, entries, strict=True))
        self.keys = record.key_of  # read only from here on: nothing runs in a replay
        self.used_keys = set(record.keys)
        self.fingerprints = record.fingerprints
        self._announce_hits(list(record.node_ids), record.shown)

    def _same_fingerprint(self, node_id: str, record: RunRecord) -> bool:
        """Whether the node's fingerprint is the recorded one (False if it fails: the normal
        path reports that)."""
        try:
            fingerprint = repr(self._fingerprint(node_id))
        except Exception:  # noqa: BLE001 - reported when the node's key is computed
            return False
        self.fingerprints[node_id] = fingerprint
        return record.fingerprints.get(node_id) == fingerprint

    # -- cache hits -------------------------------------------------------------------------
    def _precache(self, order: list[str], last: RunRecord | None) -> None:
        """Resolve from the cache every node whose inputs are all known and whose key hits;
        a node unchanged since `last` (which still holds), with all its sources, keeps its
        recorded key. When validation tells what changed since `last`'s prompt, the nodes
        upstream of no change keep theirs without each being looked at."""
        edit = self.prompt.edit
        rest = None
        if last is not None and edit is not None and edit.before is last.nodes:
            rest = self._keep_unchanged(order, last, edit.changed)
        if rest is None:
            self._announce_hits(self._look_up(order, last))
            return
        fresh = self._look_up(rest, None)
        looked_at = set(rest)
        shown = tuple(node_id for node_id in last.shown
                      if node_id in self.resolved and node_id not in looked_at)
        self._announce_hits([node_id for node_id in order if node_id in self.resolved],
                            shown + self._shown(fresh))

    def _look_up(self, nodes: list[str], last: RunRecord | None) -> list[str]:
        """Resolve each of `nodes` (in order) whose inputs are resolved and whose key hits;
        returns those hits."""
        hits = []
        resolved = self.resolved
        kept: set[str] = set()  # nodes whose recorded key holds
        for node_id in nodes:
            facts = self.facts(node_id)
            lazy = facts.lazy
            if any(src not in resolved for name, src, _ in facts.links if name not in lazy):
                continue  # an input must be computed first, so this node cannot be a hit yet
            key = self._kept_key(facts, last, kept) if last is not None else None
            if key is None:
                try:
                    key = self._key(node_id)
                except Exception:  # noqa: BLE001 - a failing fingerprint is re-raised later
                    continue
            self.keys[node_id] = key
            entry = self.ex.cache.get(key)
            if entry is not None:
                self._accept(node_id, key, entry)
                hits.append(node_id)
        return hits

    def _keep_unchanged(self, order: list[str], last: RunRecord,
                        changed: frozenset[str]) -> list[str] | None:
        """Resolve with their recorded keys the nodes of `order` downstream of no change: no
        changed or new node, none whose fingerprint changed. Returns the others (in order), or
        None when the cache no longer holds a kept entry (then nothing is resolved)."""
        dirty = last.stale(self.prompt, order, self.rank, changed,
                           lambda node_id: self._same_fingerprint(node_id, last))
        kept = [node_id for node_id in order if node_id not in dirty]
        keys = list(map(last.key_of.__getitem__, kept))
        entries = self.ex.cache.get_many(keys)
        if entries is None:
            return None
        self.resolved.update(zip(kept, entries, strict=True))
        self.keys.update(zip(kept, keys, strict=True))
        self.used_keys.update(keys)
        return [node_id for node_id in order if node_id in dirty]

    def _kept_key(self, facts: NodeFacts, last: RunRecord, kept: set[str]) -> str | None:
        """The node's recorded key, if it still holds (adding the node to `kept`)."""
        node_id = facts.node.node_id
        if (node_id in last.key_of and all(src in kept for _, src, _ in facts.links)
                and last.unchanged(facts.node)
                and (not facts.fingerprinted or self._same_fingerprint(node_id, last))):
            kept.add(node_id)
            return last.key_of[node_id]
        return None

    def _announce_hits(self, hits: list[str], shown: tuple[str, ...] | None = None) -> None:
        """One `execution_cached` for all hits, then `executed` for those showing output
        (`shown`, when known)."""
        self.result.cached.extend(hits)
        self.emit("execution_cached", nodes=hits, timestamp=timestamp_ms())
        if not self.silent:
            self.listener.nodes_cached(self.prompt_id, hits)
        for node_id in self._shown(hits) if shown is None else shown:
            ui = self.resolved[node_id].ui
            self.result.outputs[node_id] = ui
            self.emit("executed", node=node_id,
                      display_node=self.expansions.dynamic.get_display_node_id(node_id), output=ui)

    def _shown(self, hits: list[str]) -> tuple[str, ...]:
        """The output nodes among `hits` with a UI dict."""
        return tuple(node_id for node_id in hits if self.resolved[node_id].ui is not None
                     and self.facts(node_id).schema.output_node)

    def _accept(self, node_id: str, key: str, entry: CacheEntry) -> None:
        self.resolved[node_id] = entry
        self.used_keys.add(key)
        self.keys[node_id] = key
