"""The `progress_state` message of one prompt: every node started so far with its value, max and
running/finished state, sent again when one of them changes.

Each message lists every node, so sending one per change costs O(n^2) over a run of n nodes
(ComfyUI pays that: minutes for a 10k-node graph). A client replaces its state with each message,
so a message skipped is lost once a later one arrives. Messages are sent as long as the entries
sent stay within ALLOWANCE + ENTRIES_PER_CHANGE x changes (a prompt of up to ~120 nodes gets every
message, as from ComfyUI); a skipped one is sent at the next change that fits the budget, when
the prompt ends, or once no change came for STALE_DELAY_S (a slow node started), whichever comes
first. Entries are encoded once per change and joined, so a message costs a copy of its text."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

from engine.events import NodeLineage
from web.jsonio import dumps

ALLOWANCE = 16384
ENTRIES_PER_CHANGE = 2
STALE_DELAY_S = 0.05  # a slow node that starts after a skipped message shows within this time


class ProgressStates:
    """Node states of prompt `prompt_id`; `send` delivers an encoded message (any thread),
    `call_later(seconds, callback)` runs the callback later on another thread. Thread-safe."""

    def __init__(self, prompt_id: str, send: Callable[[str], None],
                 call_later: Callable[[float, Callable[[], None]], None]) -> None:
        self.prompt_id = prompt_id
        self._send = send
        self._call_later = call_later
        self._head = f'{{"type": "progress_state", "data": {{"prompt_id": {json.dumps(prompt_id)}, '
        self._entries: dict[str, str] = {}  # node id -> its encoded `"id": {...}` entry
        self._max: dict[str, float] = {}
        self._lock = threading.Lock()
        self._changes = 0
        self._sent_entries = 0
        self._stale = False
        self._flush_scheduled = False
        self._changed_at = 0.0  # monotonic time of the latest change
        # nodes expansions added: their display, parent and real node ids (others: themselves)
        self.lineage: dict[str, NodeLineage] = {}

    def max_of(self, node_id: str) -> float:
        """The node's latest `max` (1 for a node not seen)."""
        return self._max.get(node_id, 1)

    def set(self, node_id: str, state: str, value: float, top: float, *,
            announce: bool = True) -> None:
        """Record a node's state; `announce`: this is a change clients are told about."""
        known = self.lineage.get(node_id)
        entry = {"value": value, "max": top, "state": state, "node_id": node_id,
                 "prompt_id": self.prompt_id,
                 "display_node_id": node_id if known is None else known.display_node,
                 "parent_node_id": None if known is None else known.parent_node,
                 "real_node_id": node_id if known is None else known.real_node_id}
        encoded = f"{json.dumps(node_id)}: {dumps(entry)}"
        with self._lock:
            self._entries[node_id] = encoded
            self._max[node_id] = top
            if announce:
                self._changed()

    def announce(self) -> None:
        """Tell clients about changes recorded with `announce=False`."""
        with self._lock:
            self._changed()

    def flush(self) -> None:
        """Send the latest states if the last change was not sent (at the end of a prompt)."""
        with self._lock:
            if self._stale:
                self._send_all()

    def _changed(self) -> None:
        self._changes += 1
        budget = ALLOWANCE + ENTRIES_PER_CHANGE * self._changes
        if self._sent_entries + len(self._entries) <= budget:
            self._send_all()
            return
        self._stale = True
        self._changed_at = time.monotonic()
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._call_later(STALE_DELAY_S, self._flush_when_quiet)

    def _flush_when_quiet(self) -> None:
        with self._lock:
            if not self._stale:
                self._flush_scheduled = False
                return
            quiet_for = time.monotonic() - self._changed_at
            if quiet_for >= STALE_DELAY_S:
                self._flush_scheduled = False
                self._send_all()
            else:  # changes keep coming: the next change or the end sends them
                self._call_later(STALE_DELAY_S - quiet_for, self._flush_when_quiet)

    def _send_all(self) -> None:
        self._stale = False
        self._sent_entries += len(self._entries)
        self._send(f'{self._head}"nodes": {{{", ".join(self._entries.values())}}}}}}}')
