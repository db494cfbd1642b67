"""Values for widgets a prompt leaves out. A workflow saved before a widget existed (say
VAEEncodeForInpaint's grow_mask_by) has no value for it; ComfyUI's editor gives the new widget its
default when it loads such a file, and Loom does the same for every prompt it validates."""

from __future__ import annotations

import logging
from typing import Any

from engine.graph import PromptNode
from engine.node import MISSING, Input, NodeSchema

logger = logging.getLogger("loom.workflow")


def widget_default(spec: Input) -> Any:
    """The value a new widget of this input starts with: its declared default, else a fixed
    combo's first choice (as in the editor); MISSING for sockets and file lists."""
    if spec.hidden or not (spec.is_widget or spec.type == "COMBO"):
        return MISSING
    if spec.default is not MISSING:
        return spec.default
    if spec.type == "COMBO" and isinstance(spec.choices, tuple) and spec.choices:
        return spec.choices[0]
    return MISSING


def fill_missing_widgets(node: PromptNode, schema: NodeSchema) -> dict[str, Any]:
    """Give every widget the node has no value or link for its default, in place; log and
    return what was filled. (A DynamicCombo given its default choice brings that option's
    widgets, which a second pass fills.)"""
    filled = _fill_pass(node, schema)
    if filled and schema.has_dynamic:
        filled.update(_fill_pass(node, schema))
    if filled:
        shown = ", ".join(f"{name}={value!r}" for name, value in filled.items())
        logger.info("node %s (%s) has no value for %s; using the default (the workflow was "
                    "saved before these inputs existed)", node.node_id, node.class_type, shown)
    return filled


def _fill_pass(node: PromptNode, schema: NodeSchema) -> dict[str, Any]:
    filled: dict[str, Any] = {}
    for spec in schema.concrete_inputs(node.literals):
        if spec.name in node.literals or spec.name in node.links:
            continue
        value = widget_default(spec)
        if value is not MISSING:
            node.literals[spec.name] = filled[spec.name] = value
    return filled
