"""A prompt's listener calls, recorded on the worker and replayed on the server, so the server's
listener (WebSocket messages, history, the CLI's progress) sees what a local run would show,
with the worker's output file names replaced by the names the files landed under."""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any

from engine.cluster.protocol import Batch, ShippedFile
from engine.events import ExecutionListener

Rename = Callable[[dict[str, Any]], dict[str, Any]]


class RelayListener(ExecutionListener):
    """Puts each call on `stream` as (call, files): the files an `executed` event names are read
    by `collect` at that moment. `on_start` runs at execution_start; errors get `label`."""

    def __init__(self, stream: queue.Queue[Any], collect: Callable[[dict[str, Any]],
                 list[ShippedFile]], label: str, *, previews: bool = True,
                 on_start: Callable[[], None] | None = None) -> None:
        self.stream = stream
        self.collect = collect
        self.label = label
        self.previews = previews
        self.on_start = on_start
        self.started = False

    def event(self, name: str, data: dict[str, Any]) -> None:
        files: list[ShippedFile] = []
        if name == "execution_start":
            self.started = True
            if self.on_start is not None:
                self.on_start()
        elif name == "executed" and isinstance(data.get("output"), dict):
            files = self.collect(data["output"])
        elif name == "execution_error":
            data = labelled(data, self.label)
        self.stream.put((("event", name, data), files))

    def node_finished(self, prompt_id: str, node_id: str, seconds: float, cached: bool) -> None:
        self.stream.put((("finished", node_id, seconds, cached), []))

    def preview(self, prompt_id: str, node_id: str, image: Any) -> None:
        if self.previews:
            self.stream.put((("preview", node_id, image), []))

    def text(self, prompt_id: str, node_id: str, text: str) -> None:
        self.stream.put((("text", node_id, text), []))


def labelled(error: dict[str, Any], label: str) -> dict[str, Any]:
    """An execution_error payload whose message starts with the worker's label."""
    return {**error, "exception_message": f"{label}: {error.get('exception_message')}"}


def replay(batch: Batch, listener: ExecutionListener, prompt_id: str, rename: Rename) -> None:
    """Make `batch`'s calls on `listener` (its files must have landed: `rename` knows them)."""
    for call in batch.calls:
        kind = call[0]
        if kind == "event":
            name, data = call[1], call[2]
            if name == "executed" and isinstance(data.get("output"), dict):
                data = {**data, "output": rename(data["output"])}
            listener.event(name, data)
        elif kind == "finished":
            listener.node_finished(prompt_id, call[1], call[2], call[3])
        elif kind == "preview":
            listener.preview(prompt_id, call[1], call[2])
        elif kind == "text":
            listener.text(prompt_id, call[1], call[2])
        else:
            raise ValueError(f"unknown relayed call {kind!r}; expected event, finished, preview "
                             f"or text")
