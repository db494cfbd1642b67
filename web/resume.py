"""Crash recovery of partly finished prompts. Each output node's result (its `executed` output,
naming the files it saved) is journaled in the queue database as soon as the node finishes. A
prompt cut off by a crash or a shutdown runs again first; its journaled outputs are reported to
the client and kept in its history instead of being computed and written a second time, so the
files keep the names the client was first told."""

from __future__ import annotations

import logging
from typing import Any

from engine.events import ExecutionListener, timestamp_ms
from engine.executor import ExecutionResult
from engine.graph import Prompt
from web.queue import PromptQueue

logger = logging.getLogger("loom.web.resume")


class Resume:
    """One run of a queued prompt: what an earlier, cut-off run of it already saved."""

    def __init__(self, queue: PromptQueue, prompt_id: str) -> None:
        self.queue = queue
        self.prompt_id = prompt_id
        self.saved = queue.journaled_outputs(prompt_id)
        self.kept: dict[str, dict[str, Any]] = {}

    def targets(self, prompt: Prompt, outputs: list[str]) -> list[str]:
        """The outputs still to run: the journaled ones are kept, unless a remaining output
        reads from one (then it runs again, as its values are needed)."""
        kept = {node_id: ui for node_id, ui in self.saved.items() if node_id in outputs}
        rest = [node_id for node_id in outputs if node_id not in kept]
        needed = prompt.required_nodes(rest) if rest else set()
        self.kept = {node_id: ui for node_id, ui in kept.items() if node_id not in needed}
        if self.kept:
            logger.info("prompt %s resumes after a cut-off run: keeping the saved output of "
                        "node(s) %s", self.prompt_id, ", ".join(self.kept))
        return [node_id for node_id in outputs if node_id not in self.kept]

    def listener(self, inner: ExecutionListener) -> ExecutionListener:
        """`inner`, plus journaling of each output as it is saved and the kept outputs
        announced right after `execution_start`."""
        return JournalingListener(inner, self)

    def merge(self, result: ExecutionResult) -> ExecutionResult:
        """The run's result with the kept outputs in it (for the history entry)."""
        result.outputs = {**self.kept, **result.outputs}
        return result

    def announce(self, inner: ExecutionListener) -> None:
        """Tell the client about the kept outputs, as cached nodes that show their output."""
        if not self.kept:
            return
        inner.event("execution_cached", {"nodes": list(self.kept), "prompt_id": self.prompt_id,
                                         "timestamp": timestamp_ms()})
        for node_id, ui in self.kept.items():
            inner.node_finished(self.prompt_id, node_id, 0.0, True)
            inner.event("executed", {"node": node_id, "display_node": node_id, "output": ui,
                                     "prompt_id": self.prompt_id})


class JournalingListener(ExecutionListener):
    """Forwards every event to `inner`; journals each `executed` output as it happens."""

    def __init__(self, inner: ExecutionListener, resume: Resume) -> None:
        self.inner = inner
        self.resume = resume

    def event(self, name: str, data: dict[str, Any]) -> None:
        if name == "executed":  # the node has written its files: journal them first
            self.resume.queue.journal_output(self.resume.prompt_id, data["node"], data["output"])
        self.inner.event(name, data)
        if name == "execution_start":
            self.resume.announce(self.inner)

    def preview(self, prompt_id: str, node_id: str, image: Any) -> None:
        self.inner.preview(prompt_id, node_id, image)

    def text(self, prompt_id: str, node_id: str, text: str) -> None:
        self.inner.text(prompt_id, node_id, text)

    def node_finished(self, prompt_id: str, node_id: str, seconds: float, cached: bool) -> None:
        self.inner.node_finished(prompt_id, node_id, seconds, cached)

    def nodes_cached(self, prompt_id: str, node_ids: list[str]) -> None:
        self.inner.nodes_cached(prompt_id, node_ids)
