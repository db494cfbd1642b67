"""Calling one node type directly, as the executor does: a context over a temporary base
folder, and the node's outputs (or its UI dict) from keyword inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.context import InterruptFlag, NodeContext, Services, TextSink
from engine.node import Node, NodeResult
from engine.paths import Paths


def make_ctx(base: Path, class_type: str = "Test", text_sink: TextSink | None = None,
             ) -> NodeContext:
    return NodeContext(node_id="1", class_type=class_type, prompt_id="p",
                       services=Services(Paths.from_base(base)), interrupt=InterruptFlag(),
                       text_sink=text_sink)


def run_node(node_type: type[Node], ctx: NodeContext, **inputs: Any) -> tuple[Any, ...]:
    """The node's output values (dynamic inputs passed flat, as "<parent>.<member>")."""
    result = node_type().execute(ctx, **inputs)
    return tuple(result.outputs) if isinstance(result, NodeResult) else result


def run_ui(node_type: type[Node], ctx: NodeContext, **inputs: Any) -> dict[str, Any]:
    """The UI dict an output node returns."""
    result = node_type().execute(ctx, **inputs)
    assert isinstance(result, NodeResult) and result.ui is not None
    return result.ui
