"""Primitive value nodes (ComfyUI's "utils/primitive" family): constants a graph can share.

As in ComfyUI, the widgets declare no default: the editor starts them at 0, "" or false."""

from __future__ import annotations

from engine.context import NodeContext
from engine.node import Input, Node, NodeSchema, Output

_CATEGORY = "utils/primitive"
_INT_LIMIT = 2**63 - 1  # ComfyUI bounds both INT and FLOAT primitives by int64


def _primitive(name: str, display_name: str, value: Input, output: str) -> NodeSchema:
    return NodeSchema(name, (value,), (Output(output),), category=_CATEGORY,
                      display_name=display_name, comfy_v3=True)


class PrimitiveString(Node):
    schema = _primitive("PrimitiveString", "String",
                        Input("value", "STRING", options={"multiline": False}), "STRING")

    def execute(self, ctx: NodeContext, value: str) -> tuple[str]:
        return (value,)


class PrimitiveStringMultiline(Node):
    schema = _primitive("PrimitiveStringMultiline", "String (Multiline)",
                        Input("value", "STRING", options={"multiline": True}), "STRING")

    def execute(self, ctx: NodeContext, value: str) -> tuple[str]:
        return (value,)


class PrimitiveInt(Node):
    schema = _primitive("PrimitiveInt", "Int",
                        Input("value", "INT", min=-_INT_LIMIT, max=_INT_LIMIT,
                              options={"control_after_generate": True}), "INT")

    def execute(self, ctx: NodeContext, value: int) -> tuple[int]:
        return (value,)


class PrimitiveFloat(Node):
    schema = _primitive("PrimitiveFloat", "Float",
                        Input("value", "FLOAT", min=-_INT_LIMIT, max=_INT_LIMIT, step=0.1),
                        "FLOAT")

    def execute(self, ctx: NodeContext, value: float) -> tuple[float]:
        return (value,)


class PrimitiveBoolean(Node):
    schema = _primitive("PrimitiveBoolean", "Boolean", Input("value", "BOOLEAN"), "BOOLEAN")

    def execute(self, ctx: NodeContext, value: bool) -> tuple[bool]:
        return (value,)


NODE_TYPES = (PrimitiveString, PrimitiveStringMultiline, PrimitiveInt, PrimitiveFloat,
              PrimitiveBoolean)
