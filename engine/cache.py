"""The output cache: node results by structural key, under one of ComfyUI's policies
(classic, --cache-lru N, --cache-none, --cache-ram GB)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from engine.digest import nbytes_of


@dataclass
class CacheEntry:
    """One node's result: per output slot the list of values (ComfyUI list semantics), the
    identity of each slot used by downstream keys, and the node's UI dict."""

    outputs: list[list[Any]]
    identities: tuple[Any, ...]
    ui: dict[str, Any] | None
    nbytes: int = 0


class OutputCache:
    """Results by key, least recently used first.

    policy "classic": keep what the latest prompt used; "lru": keep at most `max_entries`;
    "none": keep nothing between prompts; "ram": keep at most `max_bytes` of tensor data."""

    POLICIES = ("classic", "lru", "none", "ram")

    def __init__(self, policy: str = "classic", *, max_entries: int | None = None,
                 max_bytes: int | None = None) -> None:
        if policy not in self.POLICIES:
            raise ValueError(f"unknown cache policy {policy!r}; use one of {self.POLICIES}")
        if policy == "lru" and (max_entries is None or max_entries < 1):
            raise ValueError(f"--cache-lru needs a positive entry count, got {max_entries!r}")
        if policy == "ram" and (max_bytes is None or max_bytes <= 0):
            raise ValueError(f"--cache-ram needs a positive size in GB, got {max_bytes!r}")
        self.policy = policy
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self.total_bytes = 0
        self.version = 0  # changes whenever an entry is stored or dropped

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: str) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def get_many(self, keys: Sequence[str]) -> list[CacheEntry] | None:
        """The entries of all `keys` (as many `get`s), or None if one is missing."""
        entries = self._entries
        try:
            found = list(map(entries.__getitem__, keys))
        except KeyError:
            return None
        if self.policy in ("lru", "ram"):  # recency matters only to these
            for key in keys:
                entries.move_to_end(key)
        return found

    def put(self, key: str, entry: CacheEntry) -> None:
        self.version += 1
        if self.policy == "ram":
            entry.nbytes = nbytes_of(entry.outputs)
        old = self._entries.pop(key, None)
        if old is not None:
            self.total_bytes -= old.nbytes
        self._entries[key] = entry
        self.total_bytes += entry.nbytes
        self._evict(protect=key)

    def end_prompt(self, used_keys: Iterable[str]) -> None:
        """Apply the policy once a prompt finished, given the keys it used."""
        if self.policy == "none":
            self.clear()
        elif self.policy == "classic":
            used = used_keys if isinstance(used_keys, (set, frozenset)) else set(used_keys)
            if len(used) == len(self._entries):
                return  # classic evicts nothing during a prompt: every entry was used
            for key in self._entries.keys() - used:
                self._drop(key)

    def clear(self) -> None:
        self.version += 1
        self._entries.clear()
        self.total_bytes = 0

    def _drop(self, key: str) -> None:
        self.version += 1
        entry = self._entries.pop(key)
        self.total_bytes -= entry.nbytes

    def _evict(self, protect: str) -> None:
        """Drop least recently used entries beyond the budget (never the one just stored)."""
        def over() -> bool:
            if self.policy == "lru":
                return len(self._entries) > (self.max_entries or 0)
            if self.policy == "ram":
                return self.total_bytes > (self.max_bytes or 0)
            return False

        while over():
            oldest = next(iter(self._entries))
            if oldest == protect:
                if len(self._entries) == 1:
                    return
                self._entries.move_to_end(oldest)
                continue
            self._drop(oldest)
