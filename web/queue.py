"""The prompt queue, persisted in SQLite: pending prompts survive a restart and run after it, and
a prompt that was running when the process died runs first on the next start, keeping the outputs
it had already saved (journaled as each output node finished).

Queue items are ComfyUI's tuple `[number, prompt_id, {API graph}, {extra_data}, [output ids]]`;
pending ones run in `number` order (a `front` prompt has a negative number)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from engine.snapshot import PromptSnapshot
from web.history import History, HistoryRecord, ItemText
from web.jsonio import dumps
from web.store import PromptText, Store

logger = logging.getLogger("loom.web.queue")

NUMBER_COUNTER = "number"


@dataclass
class QueueItem:
    """One queued prompt, as GET /queue lists it."""

    number: int | float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]
    # The prompt's JSON text, when known already (see PromptTexts), and the item's own.
    prompt_text: PromptText | None = field(default=None, compare=False, repr=False)
    text: str | None = field(default=None, compare=False, repr=False)
    _parts: ItemText | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]

    def parts(self) -> ItemText:
        """The item as JSON text, its prompt apart (as the queue and the history store it);
        made once."""
        if self._parts is None:
            self._parts = ItemText.of(self.to_json(), self.prompt_text)
        return self._parts

    def encoded(self) -> str:
        """The item as JSON text."""
        if self.text is None:
            self.text = self.parts().text
        return self.text

    @classmethod
    def from_json(cls, data: list[Any], text: str | None = None) -> QueueItem:
        number, prompt_id, prompt, extra_data, outputs = data
        return cls(number, prompt_id, prompt, extra_data, list(outputs), text=text)

    @property
    def client_id(self) -> str | None:
        client_id = self.extra_data.get("client_id")
        return client_id if isinstance(client_id, str) else None


class PromptTexts:
    """The JSON text of the latest prompt submitted, node by node: the same prompt posted again
    (the editor's re-run) is stored without being encoded again, and a prompt with a few nodes
    changed has only those encoded. One caller at a time."""

    def __init__(self) -> None:
        self._snapshot: PromptSnapshot | None = None
        self._nodes: dict[str, str] = {}  # node id -> its `"id": {...}` text
        self._text = PromptText.of("{}")

    def text(self, api: dict[str, Any], snapshot: PromptSnapshot) -> PromptText:
        """`api` (node ids as strings) as JSON; `snapshot` is its PromptSnapshot."""
        last = self._snapshot
        if snapshot.same_as(last):
            return self._text
        if last is not None and list(api) == list(self._nodes):  # the same nodes, some changed
            nodes = dict(self._nodes)
            changed = snapshot.changed_since(last)
        else:
            nodes, changed = {}, list(api)
        for node_id in changed:
            nodes[node_id] = f"{dumps(node_id)}: {dumps(api[node_id])}"
        self._snapshot, self._nodes = snapshot, nodes
        self._text = PromptText.of(f"{{{', '.join(nodes.values())}}}")
        return self._text


class PromptQueue:
    """Pending and running prompts. Thread-safe; `on_change` runs after every change, under the
    lock, so it must only queue work (the server queues a `status` broadcast from it).

    Items queued by this process are also kept as objects until taken, so the worker does not
    decode what was just encoded; the database is what a restart reads."""

    def __init__(self, store: Store, history: History,
                 on_change: Callable[[], None] | None = None) -> None:
        self.store = store
        self.history = history
        self.on_change = on_change
        self._wakeup = threading.Condition(store.lock)
        self._queued: dict[str, QueueItem] = {}
        self._recover()

    def _recover(self) -> None:
        """A prompt still marked running was cut off by a crash: it goes to the front."""
        with self.store.transaction() as db:
            cut_off = db.execute("UPDATE queue SET running = 0, front = 1 WHERE running = 1")
            pending = db.execute("SELECT COUNT(*) FROM queue").fetchone()[0]
        if cut_off.rowcount:
            logger.warning("%d prompt(s) were running when Loom stopped; they run again first",
                           cut_off.rowcount)
        if pending:
            logger.info("%d prompt(s) restored from the queue database", pending)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # -- numbers ------------------------------------------------------------------------------
    def next_number(self) -> int:
        """The next queue number; counts up per submitted prompt, across restarts."""
        with self.store.transaction() as db:
            row = db.execute("SELECT value FROM counters WHERE name = ?",
                             (NUMBER_COUNTER,)).fetchone()
            number = row[0] if row else 0
            db.execute("INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)",
                       (NUMBER_COUNTER, number + 1))
        return number

    # -- adding and taking ----------------------------------------------------------------------
    def put(self, item: QueueItem) -> None:
        """Queue a prompt; raises ValueError if its id is already queued."""
        with self._wakeup:
            if self.contains(item.prompt_id):
                raise ValueError(f"prompt id {item.prompt_id!r} is already queued; send a new "
                                 f"id or none (the server makes one)")
            parts = item.parts()
            with self.store.transaction() as db:
                self.store.keep_prompt(db, parts.prompt)
                db.execute("INSERT INTO queue (prompt_id, number, item, prompt_digest, prompt_at) "
                           "VALUES (?, ?, ?, ?, ?)", (item.prompt_id, item.number,
                                                      parts.head + parts.tail,
                                                      parts.prompt.digest, len(parts.head)))
            self._queued[item.prompt_id] = item
            self._changed()  # before the worker wakes: clients see the new size before its run
            self._wakeup.notify_all()

    def take(self, timeout: float | None = None) -> QueueItem | None:
        """Mark the next pending prompt running and return it; None if none came in time."""
        with self._wakeup:
            row = self._next_pending()
            if row is None:
                self._wakeup.wait(timeout)
                row = self._next_pending()
            if row is None:
                return None
            with self.store.transaction() as db:
                db.execute("UPDATE queue SET running = 1 WHERE seq = ?", (row[0],))
            self._changed()
            item = self._queued.pop(row[1], None)
            if item is None:  # queued before a restart
                text = self.store.rows("SELECT item FROM queue_items WHERE seq = ?",
                                       (row[0],))[0][0]
                item = QueueItem.from_json(json.loads(text), text)
        return item

    def _next_pending(self) -> tuple[int, str] | None:
        rows = self.store.rows("SELECT seq, prompt_id FROM queue WHERE running = 0 "
                               "ORDER BY front DESC, number, seq LIMIT 1")
        return rows[0] if rows else None

    def finish(self, prompt_id: str, record: HistoryRecord) -> None:
        """The prompt ended: add its history entry and drop it from the queue and its journal,
        atomically (the entry first: it keeps the prompt text the queue row pointed to)."""
        with self.store.transaction() as db:
            self.history.insert(db, record)
            db.execute("DELETE FROM queue WHERE prompt_id = ?", (prompt_id,))
            db.execute("DELETE FROM journal WHERE prompt_id = ?", (prompt_id,))
        self._changed()

    def requeue(self, prompt_id: str) -> None:
        """A running prompt goes back to pending, ahead of everything else (its worker died)."""
        with self._wakeup:
            with self.store.transaction() as db:
                db.execute("UPDATE queue SET running = 0, front = 1 WHERE prompt_id = ?",
                           (prompt_id,))
            self._changed()
            self._wakeup.notify_all()

    # -- the output journal of running prompts ------------------------------------------------
    def journal_output(self, prompt_id: str, node_id: str, ui: dict[str, Any]) -> None:
        """Record that output node `node_id` of the running prompt saved `ui` (its files)."""
        with self.store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO journal (prompt_id, node_id, ui) VALUES (?, ?, ?)",
                       (prompt_id, node_id, dumps(ui)))

    def journaled_outputs(self, prompt_id: str) -> dict[str, dict[str, Any]]:
        """What a cut-off run of `prompt_id` saved, by output node id ({} for a fresh prompt)."""
        rows = self.store.rows("SELECT node_id, ui FROM journal WHERE prompt_id = ? ORDER BY "
                               "rowid", (prompt_id,))
        return {node_id: json.loads(ui) for node_id, ui in rows}

    def wake(self) -> None:
        """Wake a waiting `take` (used when stopping)."""
        with self._wakeup:
            self._wakeup.notify_all()

    # -- reading ----------------------------------------------------------------------------
    def running(self) -> list[QueueItem]:
        return self._items("running = 1")

    def pending(self) -> list[QueueItem]:
        """Pending prompts in the order they will run."""
        return self._items("running = 0")

    def _items(self, where: str) -> list[QueueItem]:
        rows = self.store.rows(f"SELECT item FROM queue_items WHERE {where} "
                               f"ORDER BY front DESC, number, seq")
        return [QueueItem.from_json(json.loads(item)) for (item,) in rows]

    def contains(self, prompt_id: str) -> bool:
        return bool(self.store.rows("SELECT 1 FROM queue WHERE prompt_id = ?", (prompt_id,)))

    def remaining(self) -> int:
        """Running plus pending prompts (`exec_info.queue_remaining`)."""
        return self.store.rows("SELECT COUNT(*) FROM queue")[0][0]

    # -- removing ---------------------------------------------------------------------------
    def delete(self, prompt_ids: Iterable[str]) -> list[str]:
        """Remove these pending prompts (a running one is left alone); returns those removed."""
        wanted = [p for p in prompt_ids if isinstance(p, str)]
        removed = []
        with self.store.transaction() as db:
            for prompt_id in wanted:
                done = db.execute("DELETE FROM queue WHERE prompt_id = ? AND running = 0",
                                  (prompt_id,))
                if done.rowcount:
                    db.execute("DELETE FROM journal WHERE prompt_id = ?", (prompt_id,))
                    removed.append(prompt_id)
            for prompt_id in removed:
                self._queued.pop(prompt_id, None)
        if removed:
            self._changed()
        return removed

    def clear(self) -> list[str]:
        """Remove every pending prompt; returns their ids."""
        with self.store.transaction() as db:
            ids = [row[0] for row in db.execute(
                "SELECT prompt_id FROM queue WHERE running = 0").fetchall()]
            db.execute("DELETE FROM queue WHERE running = 0")
            db.execute("DELETE FROM journal WHERE prompt_id NOT IN (SELECT prompt_id FROM queue)")
            for prompt_id in ids:
                self._queued.pop(prompt_id, None)
        if ids:
            self._changed()
        return ids
