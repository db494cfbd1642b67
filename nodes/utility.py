"""Primitive value nodes (ComfyUI's "utils/primitive" family): constants a graph can share."""

from __future__ import annotations

from engine.context import NodeContext
from engine.node import Boolean, Float, Int, Node, NodeSchema, Output, String

_CATEGORY = "utils/primitive"
_INT_LIMIT = 2**63 - 1


class PrimitiveString(Node):
    schema = NodeSchema("PrimitiveString", (String("value", default=""),), (Output("STRING"),),
                        category=_CATEGORY, display_name="String")

    def execute(self, ctx: NodeContext, value: str) -> tuple[str]:
        return (value,)


class PrimitiveStringMultiline(Node):
    schema = NodeSchema("PrimitiveStringMultiline",
                        (String("value", default="", multiline=True),), (Output("STRING"),),
                        category=_CATEGORY, display_name="String (Multiline)")

    def execute(self, ctx: NodeContext, value: str) -> tuple[str]:
        return (value,)


class PrimitiveInt(Node):
    schema = NodeSchema("PrimitiveInt",
                        (Int("value", 0, min=-_INT_LIMIT, max=_INT_LIMIT,
                             options={"control_after_generate": True}),),
                        (Output("INT"),), category=_CATEGORY, display_name="Int")

    def execute(self, ctx: NodeContext, value: int) -> tuple[int]:
        return (value,)


class PrimitiveFloat(Node):
    schema = NodeSchema("PrimitiveFloat", (Float("value", 0.0, min=-1e300, max=1e300),),
                        (Output("FLOAT"),), category=_CATEGORY, display_name="Float")

    def execute(self, ctx: NodeContext, value: float) -> tuple[float]:
        return (value,)


class PrimitiveBoolean(Node):
    schema = NodeSchema("PrimitiveBoolean", (Boolean("value", False),), (Output("BOOLEAN"),),
                        category=_CATEGORY, display_name="Boolean")

    def execute(self, ctx: NodeContext, value: bool) -> tuple[bool]:
        return (value,)


NODE_TYPES = (PrimitiveString, PrimitiveStringMultiline, PrimitiveInt, PrimitiveFloat,
              PrimitiveBoolean)
