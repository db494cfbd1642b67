"""The SQLite file (<user dir>/loom.db) that keeps the prompt queue and the history across
restarts. One connection, used by one process; every access holds `lock`, so the HTTP thread and
the execution worker can share it."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("loom.web.store")

SCHEMA_VERSION = 2

# Schema 1, what every database starts from; MIGRATIONS bring it to SCHEMA_VERSION.
SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_id TEXT NOT NULL UNIQUE,
    number REAL NOT NULL,
    front INTEGER NOT NULL DEFAULT 0,      -- 1: was running when the process died; runs first
    running INTEGER NOT NULL DEFAULT 0,
    item TEXT NOT NULL                     -- the queue item as JSON (see web/queue.py)
);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_id TEXT NOT NULL UNIQUE,
    entry TEXT NOT NULL,                   -- the GET /history entry as JSON
    job TEXT NOT NULL,                     -- the GET /jobs list item as JSON
    status TEXT NOT NULL,                  -- completed | failed | cancelled
    create_time INTEGER NOT NULL,
    duration INTEGER NOT NULL,             -- execution end - start, ms
    workflow_id TEXT
);
CREATE INDEX IF NOT EXISTS history_create_time ON history (create_time);
CREATE TABLE IF NOT EXISTS journal (       -- outputs a running prompt already saved (a crash
    prompt_id TEXT NOT NULL,               -- resumes it without writing them again)
    node_id TEXT NOT NULL,
    ui TEXT NOT NULL,                      -- the node's `executed` output as JSON
    PRIMARY KEY (prompt_id, node_id)
);
"""

# Schema 2: a prompt's graph (the JSON text of the API prompt, often most of a row) is stored
# once in `prompts`, under the digest of its text, and the queue and history rows of every
# prompt with that graph point to it: the row keeps its own text with the graph cut out at
# character `prompt_at`. The editor queues the same graph again and again, and a prompt's queue
# row and history row hold the same graph, so each is written once. Rows written by schema 1
# (prompt_digest NULL) keep their whole text. A graph goes when the last row pointing to it
# goes (the triggers). The views give every row's whole text back, as schema 1 stored it.
MIGRATIONS = {2: """
CREATE TABLE prompts (
    digest TEXT PRIMARY KEY,               -- blake2b of `text` (see PromptText)
    text TEXT NOT NULL                     -- the API prompt as JSON
);
ALTER TABLE queue ADD COLUMN prompt_digest TEXT;
ALTER TABLE queue ADD COLUMN prompt_at INTEGER;
ALTER TABLE history ADD COLUMN prompt_digest TEXT;
ALTER TABLE history ADD COLUMN prompt_at INTEGER;
CREATE INDEX queue_prompt ON queue (prompt_digest);
CREATE INDEX history_prompt ON history (prompt_digest);
{triggers}
CREATE VIEW queue_items AS
    SELECT queue.seq, queue.prompt_id, queue.number, queue.front, queue.running,
           CASE WHEN queue.prompt_digest IS NULL THEN queue.item
                ELSE substr(queue.item, 1, queue.prompt_at) || ifnull(prompts.text, 'null')
                     || substr(queue.item, queue.prompt_at + 1) END AS item
    FROM queue LEFT JOIN prompts ON prompts.digest = queue.prompt_digest;
CREATE VIEW history_entries AS
    SELECT history.seq, history.prompt_id, history.prompt_digest IS NULL AS whole,
           CASE WHEN history.prompt_digest IS NULL THEN history.entry
                ELSE substr(history.entry, 1, history.prompt_at) || ifnull(prompts.text, 'null')
                     || substr(history.entry, history.prompt_at + 1) END AS entry
    FROM history LEFT JOIN prompts ON prompts.digest = history.prompt_digest;
""".format(triggers="".join(f"""
CREATE TRIGGER {table}_row_gone AFTER DELETE ON {table} WHEN OLD.prompt_digest IS NOT NULL
BEGIN
    DELETE FROM prompts WHERE digest = OLD.prompt_digest
        AND NOT EXISTS (SELECT 1 FROM queue WHERE prompt_digest = OLD.prompt_digest)
        AND NOT EXISTS (SELECT 1 FROM history WHERE prompt_digest = OLD.prompt_digest);
END;""" for table in ("queue", "history")))}


@dataclass(frozen=True, slots=True)
class PromptText:
    """A prompt's graph as JSON text, with the digest it is stored under (see `prompts`)."""

    text: str
    digest: str

    @classmethod
    def of(cls, text: str) -> PromptText:
        return cls(text, hashlib.blake2b(text.encode(), digest_size=16).hexdigest())


class StoreError(RuntimeError):
    """The database cannot be opened or used (locked by another process, closed, corrupt)."""


class Store:
    """A thread-safe SQLite connection in WAL mode."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.RLock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db: sqlite3.Connection | None = self._open_or_set_aside(path)

    @classmethod
    def _open_or_set_aside(cls, path: Path) -> sqlite3.Connection:
        """Open the database; a file that is not one is renamed (kept) and a new one started."""
        try:
            return cls._open(path)
        except sqlite3.OperationalError as exc:  # locked, read-only, disk full...
            raise StoreError(f"cannot open the queue database {path}: {exc}; check the user "
                             f"directory is writable and no other Loom uses it") from exc
        except sqlite3.DatabaseError as exc:
            kept = path.with_name(f"{path.name}.damaged-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                source = path.with_name(path.name + suffix)
                if source.exists():
                    source.rename(kept.with_name(kept.name + suffix))
            logger.error("%s is damaged (%s); it was renamed to %s and a new, empty queue and "
                         "history were started", path, exc, kept)
            return cls._open(path)

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        try:
            # WAL + NORMAL survives a killed process without losing committed rows (only a
            # power cut can drop the last transactions) and keeps each commit cheap.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{path} was written by a newer Loom (schema {version}; this "
                                 f"one knows {SCHEMA_VERSION}); upgrade Loom or move the file")
            db.executescript(SCHEMA)
            for target in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
                Store._migrate(db, target)
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    def _migrate(db: sqlite3.Connection, target: int) -> None:
        """Bring the database from schema target - 1 to `target` in one transaction: every row
        is kept, or nothing changes."""
        logger.info("upgrading the queue database to schema %d", target)
        try:
            db.executescript(f"BEGIN IMMEDIATE;\n{MIGRATIONS[target]}\n"
                             f"PRAGMA user_version={target};\nCOMMIT;")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"the queue database {self.path} is closed (the server is stopping)")
        return self._db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock and run the block's statements as one atomic write."""
        with self.lock:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @staticmethod
    def keep_prompt(db: sqlite3.Connection, prompt: PromptText) -> None:
        """Store `prompt` inside the caller's transaction, unless a row already holds it (the
        same graph queued again is not written again)."""
        if db.execute("SELECT 1 FROM prompts WHERE digest = ?", (prompt.digest,)).fetchone():
            return
        db.execute("INSERT INTO prompts (digest, text) VALUES (?, ?)",
                   (prompt.digest, prompt.text))

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            return self.db.execute(sql, params).fetchall()

    def close(self) -> None:
        with self.lock:
            if self._db is not None:
                self._db.close()
                self._db = None
                logger.info("closed %s", self.path)
