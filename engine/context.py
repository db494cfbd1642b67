"""What a running node may ask of the engine: progress, cancellation, paths and services."""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.diffusion.memory.model_manager import ModelManager
from engine.diffusion.text.tokenizer import BpeCache
from engine.graph import GraphPlanner
from engine.image_budget import ImageBudget
from engine.paths import Paths


class ExecutionInterrupted(Exception):
    """Raised when the user interrupted the prompt; `node_id` is where it was noticed."""

    def __init__(self, node_id: str | None = None) -> None:
        super().__init__(f"interrupted at node {node_id}" if node_id else "interrupted")
        self.node_id = node_id


class InterruptFlag:
    """A thread-safe interrupt request, optionally aimed at one prompt id."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()


@dataclass
class Services:
    """Long-lived objects shared by every node of a process (created in main.py); `args` and
    `model_manager` are None only in tests that run no model nodes."""

    paths: Paths
    args: argparse.Namespace | None = None
    model_manager: ModelManager | None = None
    bpe: BpeCache = field(default_factory=BpeCache)  # the CLIP vocabulary, read on first use
    graph_planner: GraphPlanner = field(default_factory=GraphPlanner)
    image_budget: ImageBudget = field(default_factory=lambda: ImageBudget.from_megapixels(None))


# progress sink: (node_id, value, total, preview image or None)
ProgressSink = Callable[[str, float, float, Any], None]
# text sink: (node_id, text shown on the node)
TextSink = Callable[[str, str], None]


class NodeContext:
    """Handed to every node call. Nodes read nothing global: everything comes from here."""

    __slots__ = ("node_id", "class_type", "prompt_id", "services", "_interrupt",
                 "_progress_sink", "_text_sink", "call_index")

    def __init__(self, *, node_id: str, class_type: str, prompt_id: str, services: Services,
                 interrupt: InterruptFlag, progress_sink: ProgressSink | None = None,
                 text_sink: TextSink | None = None) -> None:
        self.node_id = node_id
        self.class_type = class_type
        self.prompt_id = prompt_id
        self.services = services
        self._interrupt = interrupt
        self._progress_sink = progress_sink
        self._text_sink = text_sink
        # which of the node's list calls is running (ComfyUI's call index: it names the nodes
        # an expanding node adds, engine/expansion.py)
        self.call_index = 0

    @property
    def interrupt_flag(self) -> InterruptFlag:
        """The flag this node's prompt is interrupted through (shared with nested calls)."""
        return self._interrupt

    @property
    def progress_sink(self) -> ProgressSink | None:
        return self._progress_sink

    @property
    def text_sink(self) -> TextSink | None:
        return self._text_sink

    @property
    def paths(self) -> Paths:
        return self.services.paths

    @property
    def models(self) -> ModelManager | None:
        return self.services.model_manager

    def check_interrupted(self) -> None:
        """Raise ExecutionInterrupted if the user asked to stop."""
        if self._interrupt.is_set():
            raise ExecutionInterrupted(self.node_id)

    def progress(self, value: float, total: float, preview: Any = None) -> None:
        """Report `value` of `total` steps (and optionally a preview image); checks interrupt."""
        if self._progress_sink is not None:
            self._progress_sink(self.node_id, value, total, preview)
        self.check_interrupted()

    def show_text(self, text: str) -> None:
        """Show `text` on this node in the editor while the prompt runs (nowhere in the CLI)."""
        if self._text_sink is not None:
            self._text_sink(self.node_id, text)
