"""A bounded in-memory copy of the recent log lines, for the editor's error dialog
(`GET /internal/logs`) and its log terminal (`GET /internal/logs/raw`)."""

from __future__ import annotations

import logging
import shutil
import threading
from collections import deque
from datetime import datetime, timezone
from typing import Any

DEFAULT_MAX_ENTRIES = 1000


class LogBuffer(logging.Handler):
    """Keeps the last `max_entries` formatted records; thread-safe (logging locks `emit`)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self._entries: deque[dict[str, str]] = deque(maxlen=max_entries)
        self._subscribers: set[str] = set()
        self._subscribers_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except (TypeError, ValueError):  # a bad format string in someone's log call
            self.handleError(record)
            return
        stamp = datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat()
        self._entries.append({"t": stamp, "m": message + "\n"})

    def entries(self) -> list[dict[str, str]]:
        """[{"t": ISO time, "m": line}] oldest first (the shape of /internal/logs/raw)."""
        return list(self._entries)

    def text(self) -> str:
        return "".join(entry["m"] for entry in self.entries())

    def raw(self) -> dict[str, Any]:
        """The body of /internal/logs/raw: entries plus the terminal size the lines assume."""
        size = shutil.get_terminal_size(fallback=(80, 24))
        return {"entries": self.entries(), "size": {"cols": size.columns, "rows": size.lines}}

    def subscribe(self, client_id: str, enabled: bool) -> None:
        """Record which WebSocket clients asked for live log lines (`logs` messages)."""
        with self._subscribers_lock:
            (self._subscribers.add if enabled else self._subscribers.discard)(client_id)

    def subscribers(self) -> set[str]:
        with self._subscribers_lock:
            return set(self._subscribers)

    def install(self, logger: logging.Logger | None = None) -> LogBuffer:
        """Attach to `logger` (the root logger by default), replacing an earlier LogBuffer."""
        target = logger or logging.getLogger()
        for handler in list(target.handlers):
            if isinstance(handler, LogBuffer):
                target.removeHandler(handler)
        target.addHandler(self)
        return self
