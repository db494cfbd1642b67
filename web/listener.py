"""Turns one prompt's executor events into the WebSocket messages ComfyUI clients expect, and
keeps what its history entry needs (status messages, the timings of the nodes that ran).

Besides forwarding events, it derives `progress_state` (see web/progress_state.py): every node
started so far in the run with its value, max and running/finished state. A node's `finished`
state follows its `executed` message; cached nodes appear only when they have an output."""

from __future__ import annotations

import logging
from typing import Any

from engine.events import ExecutionListener, NodeLineage
from web.previews import PreviewError, encode_jpeg, text_frame
from web.progress_state import ProgressStates
from web.websocket import SocketHub

logger = logging.getLogger("loom.web.listener")

# The messages a history entry's status keeps (as ComfyUI does).
RECORDED = frozenset({"execution_start", "execution_cached", "execution_success",
                      "execution_error", "execution_interrupted"})
ENDINGS = frozenset({"execution_success", "execution_error", "execution_interrupted"})


class SocketListener(ExecutionListener):
    """Events of prompt `prompt_id`, sent to client `client_id` (nobody when None)."""

    def __init__(self, hub: SocketHub, prompt_id: str, client_id: str | None, *,
                 previews: bool = True) -> None:
        self.hub = hub
        self.prompt_id = prompt_id
        self.client_id = client_id
        self.previews = previews
        self.messages: list[list[Any]] = []
        self.timings: dict[str, dict[str, Any]] = {}
        self.states = ProgressStates(prompt_id, self._send_states, hub.call_later)
        self.current: dict[str, Any] | None = None  # the latest `executing` payload
        self._finishing: str | None = None  # a node that ran, awaiting its finished state

    # -- ExecutionListener ------------------------------------------------------------------
    def event(self, name: str, data: dict[str, Any]) -> None:
        if name == "executing" and data.get("node") is None:
            return  # the end marker: the worker sends it after the final queue status
        finishing = self._finishing
        ends_node = name == "executed" and finishing is not None and data["node"] == finishing
        if finishing is not None and not ends_node:
            self._flush()
        if name in ENDINGS:
            self.states.flush()
        if name in RECORDED:
            self.messages.append([name, data])
        if name == "executing":
            self.current = data
            self.states.set(data["node"], "running", 0, 1)
        elif name == "progress":
            self.states.set(data["node"], "running", data["value"], data["max"], announce=False)
        self.hub.send(name, data, self.client_id)
        if name == "progress":
            self.states.announce()
        if ends_node:
            self._flush()
        elif name == "executed":  # from a cached node (a node that ran is `finishing`)
            self.states.set(data["node"], "finished", 1, 1)

    def node_finished(self, prompt_id: str, node_id: str, seconds: float, cached: bool) -> None:
        if cached:
            return  # see nodes_cached
        self.timings[node_id] = {"seconds": round(seconds, 6), "cached": False}
        if self._finishing is not None:
            self._flush()
        self._finishing = node_id

    def node_added(self, prompt_id: str, lineage: NodeLineage) -> None:
        self.states.lineage[lineage.node_id] = lineage

    def nodes_cached(self, prompt_id: str, node_ids: list[str]) -> None:
        """No timings for them: the history's `execution_cached` message names them."""

    def preview(self, prompt_id: str, node_id: str, image: Any) -> None:
        if not self.previews or self.client_id is None:
            return
        try:
            jpeg = encode_jpeg(image)
        except (PreviewError, OSError, ValueError) as exc:
            logger.warning("node %s: preview not sent: %s", node_id, exc)
            return
        self.hub.send_preview(jpeg, prompt_id, node_id, self.client_id,
                              self.states.lineage.get(node_id))

    def text(self, prompt_id: str, node_id: str, text: str) -> None:
        # to every client for an anonymous prompt, as ComfyUI's progress_text does
        self.hub.send_binary(text_frame(node_id, text), self.client_id)

    # -- the end -------------------------------------------------------------------------------
    def finish(self) -> None:
        """Send what is still held back (call once the executor returned)."""
        if self._finishing is not None:
            self._flush()
        self.states.flush()

    def send_end_marker(self) -> None:
        """`executing {node: null}`: the prompt is over (scripts wait for it)."""
        self.current = None
        self.hub.send("executing", {"node": None, "prompt_id": self.prompt_id}, self.client_id)

    # -- progress_state ---------------------------------------------------------------------------
    def _flush(self) -> None:
        """Mark the node that just ran as finished."""
        assert self._finishing is not None
        node_id, self._finishing = self._finishing, None
        top = self.states.max_of(node_id)
        self.states.set(node_id, "finished", top, top)

    def _send_states(self, text: str) -> None:
        if self.client_id is None:
            self.hub.broadcast_text(text)  # ComfyUI's behaviour for anonymous prompts
        else:
            self.hub.send_text(text, self.client_id)
