"""Finished prompts, persisted in SQLite and bounded by an item count (oldest dropped first).

An entry is what GET /history returns per prompt id: `prompt` (the queue item), `outputs` (UI
dict per output node), `status` {status_str, completed, messages}, `meta` per output node, plus
Loom's `timings`: seconds per node that ran ({"seconds", "cached": false}); the nodes answered
from the cache are those the `execution_cached` message of `status.messages` lists."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from engine.events import NodeLineage
from web.jobs import history_job
from web.jsonio import dumps, strict_text
from web.store import PromptText, Store

DEFAULT_MAX_ITEMS = 10000
# GET /history without max_items answers the newest this many (the editor asks for 200; other
# clients page with max_items and offset), so the reply stays small however long the history.
DEFAULT_REPLY_ITEMS = 200
PAGE_ROWS = 64  # rows read from SQLite per step of a streamed reply


@dataclass(frozen=True)
class ItemText:
    """A queue item's JSON text in three parts: what comes before its prompt, the prompt, and
    what comes after (the queue and the history store the prompt apart, see web/store.py)."""

    head: str
    prompt: PromptText
    tail: str

    @classmethod
    def of(cls, item: list[Any], prompt: PromptText | None = None) -> ItemText:
        """The text of queue item `item`; `prompt`: its prompt's text, when known already."""
        number, prompt_id, api, extra_data, outputs = item
        return cls(f"[{dumps(number)}, {dumps(prompt_id)}, ",
                   prompt if prompt is not None else PromptText.of(dumps(api)),
                   f", {dumps(extra_data)}, {dumps(outputs)}]")

    @property
    def text(self) -> str:
        return f"{self.head}{self.prompt.text}{self.tail}"


@dataclass
class HistoryRecord:
    """One finished prompt, ready to store: its entry's JSON text is `head`, the prompt's text,
    then `tail`."""

    prompt_id: str
    entry: dict[str, Any]
    job: dict[str, Any]
    head: str
    prompt: PromptText
    tail: str

    @classmethod
    def build(cls, item: list[Any], outputs: dict[str, Any], status_str: str,
              messages: list[list[Any]], timings: dict[str, dict[str, Any]],
              item_text: ItemText | None = None,
              lineage: Mapping[str, NodeLineage] | None = None) -> HistoryRecord:
        """The entry of queue item `item` that ended with `status_str` success|error;
        `item_text`: the item's text, when known (a large prompt is not encoded again);
        `lineage`: where the nodes expansions added come from (their meta)."""
        lineage = lineage or {}
        prompt_id = item[1]
        rest = {
            "outputs": outputs,
            "status": {"status_str": status_str, "completed": status_str == "success",
                       "messages": messages},
            "meta": {node_id: lineage[node_id].meta() if node_id in lineage else
                     {"node_id": node_id, "display_node": node_id, "parent_node": None,
                      "real_node_id": node_id} for node_id in outputs},
            "timings": timings,
        }
        entry = {"prompt": item, **rest}
        parts = item_text if item_text is not None else ItemText.of(item)
        return cls(prompt_id, entry, history_job(prompt_id, entry), f'{{"prompt": {parts.head}',
                   parts.prompt, f"{parts.tail}, {dumps(rest)[1:]}")

    @property
    def entry_text(self) -> str:
        """`entry` as JSON."""
        return f"{self.head}{self.prompt.text}{self.tail}"


def _strict(entry: str, whole: int) -> str:
    """A stored entry as strict JSON: rows written in parts (schema 2) were written by
    web.jsonio.dumps, strict already; older whole rows may need rewriting."""
    return strict_text(entry) if whole else entry


class History:
    """Read and write access to the history table; `max_items` bounds it."""

    def __init__(self, store: Store, max_items: int = DEFAULT_MAX_ITEMS) -> None:
        if max_items < 1:
            raise ValueError(f"the history must keep at least 1 item, got {max_items}")
        self.store = store
        self.max_items = max_items

    def insert(self, db: sqlite3.Connection, record: HistoryRecord) -> None:
        """Add (or replace) an entry inside the caller's transaction, then trim the oldest."""
        job = record.job
        duration = (job.get("execution_end_time") or 0) - (job.get("execution_start_time") or 0)
        db.execute("DELETE FROM history WHERE prompt_id = ?", (record.prompt_id,))
        self.store.keep_prompt(db, record.prompt)
        db.execute("INSERT INTO history (prompt_id, entry, prompt_digest, prompt_at, job, status, "
                   "create_time, duration, workflow_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (record.prompt_id, record.head + record.tail, record.prompt.digest,
                    len(record.head), dumps(job), job["status"], job.get("create_time") or 0,
                    max(duration, 0), job.get("workflow_id")))
        db.execute("DELETE FROM history WHERE seq <= (SELECT seq FROM history ORDER BY seq DESC "
                   "LIMIT 1 OFFSET ?)", (self.max_items,))

    def add(self, record: HistoryRecord) -> None:
        with self.store.transaction() as db:
            self.insert(db, record)

    def count(self) -> int:
        return self.store.rows("SELECT COUNT(*) FROM history")[0][0]

    def pages(self, max_items: int | None = None, offset: int = -1,
              ) -> Iterator[list[tuple[str, str]]]:
        """GET /history's (prompt id, entry JSON text) rows, oldest first, a page at a time so a
        reply never holds the whole history: the newest `max_items` (DEFAULT_REPLY_ITEMS when
        None), or with `offset` that many from position `offset` (counted from the oldest).
        The text is strict JSON (see `entry_text`)."""
        wanted = DEFAULT_REPLY_ITEMS if max_items is None else max(max_items, 0)
        if offset < 0:
            offset = max(self.count() - wanted, 0)
        start = self.store.rows("SELECT seq FROM history ORDER BY seq LIMIT 1 OFFSET ?",
                                (offset,))
        after = start[0][0] - 1 if start else None
        while after is not None and wanted > 0:
            rows = self.store.rows("SELECT seq, prompt_id, entry, whole FROM history_entries "
                                   "WHERE seq > ? ORDER BY seq LIMIT ?",
                                   (after, min(wanted, PAGE_ROWS)))
            if not rows:
                return
            wanted -= len(rows)
            after = rows[-1][0]
            yield [(prompt_id, _strict(entry, whole)) for _, prompt_id, entry, whole in rows]

    def entry(self, prompt_id: str) -> dict[str, Any] | None:
        text = self.entry_text(prompt_id)
        return json.loads(text) if text is not None else None

    def entry_text(self, prompt_id: str) -> str | None:
        """The entry as stored (JSON text), for replies that need not decode it. Strict JSON:
        a row from before schema 2 may hold NaN or Infinity, written as null here."""
        rows = self.store.rows("SELECT entry, whole FROM history_entries WHERE prompt_id = ?",
                               (prompt_id,))
        return _strict(*rows[0]) if rows else None

    def delete(self, prompt_ids: Iterable[str]) -> None:
        with self.store.transaction() as db:
            db.executemany("DELETE FROM history WHERE prompt_id = ?",
                           [(p,) for p in prompt_ids if isinstance(p, str)])

    def clear(self) -> None:
        with self.store.transaction() as db:
            db.execute("DELETE FROM history")

    def jobs(self, statuses: set[str], workflow_id: str | None, sort_by: str, descending: bool,
             limit: int | None) -> tuple[list[dict[str, Any]], int]:
        """Job list items of finished prompts with these statuses, sorted, at most `limit`
        (all when None); also the total count before the limit."""
        where = f"status IN ({', '.join('?' * len(statuses))})"
        params: list[Any] = sorted(statuses)
        if workflow_id:
            where += " AND workflow_id = ?"
            params.append(workflow_id)
        column = "duration" if sort_by == "execution_duration" else "create_time"
        direction = "DESC" if descending else "ASC"
        total = self.store.rows(f"SELECT COUNT(*) FROM history WHERE {where}", tuple(params))[0][0]
        rows = self.store.rows(f"SELECT job FROM history WHERE {where} "
                               f"ORDER BY {column} {direction}, seq {direction} LIMIT ?",
                               (*params, -1 if limit is None else limit))
        return [json.loads(job) for (job,) in rows], total
