"""Graph helpers: the lazy Switch (only the chosen branch runs), the Custom Combo whose
choices the user writes in the editor, and Preview as Text for any value."""

from __future__ import annotations

import json
from typing import Any

from engine.context import NodeContext
from engine.dynamic_inputs import MatchType
from engine.node import ANY_TYPE, Combo, Input, Link, Node, NodeResult, NodeSchema, Output


class ComfySwitchNode(Node):
    """on_true or on_false by `switch`; the other branch is never evaluated."""

    schema = NodeSchema(
        "ComfySwitchNode",
        (Input("switch", "BOOLEAN"), MatchType("on_false", "switch", lazy=True),
         MatchType("on_true", "switch", lazy=True)),
        (Output("COMFY_MATCHTYPE_V3", "output", match_template="switch"),),
        category="logic", display_name="Switch", experimental=True, comfy_v3=True)

    def check_lazy(self, ctx: NodeContext, **inputs: Any) -> list[str]:
        wanted = "on_true" if inputs.get("switch") else "on_false"
        return [wanted] if inputs.get(wanted) is None else []

    def execute(self, ctx: NodeContext, switch: bool, on_false: Any = None,
                on_true: Any = None) -> tuple[Any]:
        return (on_true if switch else on_false,)


class CustomCombo(Node):
    """The chosen string of a drop-down whose choices live in the editor (so any is valid)."""

    schema = NodeSchema("CustomCombo", (Combo("choice", (), combo_style="v3"),),
                        (Output("STRING"),), category="utils", display_name="Custom Combo",
                        experimental=True, comfy_v3=True)

    @classmethod
    def self_validated_inputs(cls) -> frozenset[str]:
        return frozenset({"choice"})

    def execute(self, ctx: NodeContext, choice: str) -> tuple[str]:
        return (choice,)


def as_text(value: Any) -> str:
    """How Preview as Text shows a value: strings as they are, numbers and booleans with str,
    other values as indented JSON when they serialise, else their str()."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)
    if value is None:
        return "None"
    try:
        return json.dumps(value, indent=4)
    except (TypeError, ValueError):
        return str(value)


class PreviewAny(Node):
    schema = NodeSchema("PreviewAny", (Link("source", ANY_TYPE),), (), category="utils",
                        display_name="Preview as Text", output_node=True)

    def execute(self, ctx: NodeContext, source: Any = None) -> NodeResult:
        return NodeResult(ui={"text": [as_text(source)]})


NODE_TYPES = (ComfySwitchNode, CustomCombo, PreviewAny)
