"""Test-only Loom-native nodes, copied into a test server's custom_nodes/ folder: an integer
source, a node adding one, a slow node that reports progress (with a preview image) each step,
an output node that shows its value, and a node that always fails."""

from __future__ import annotations

import time

from PIL import Image

from engine.context import NodeContext
from engine.node import Float, Int, Link, Node, NodeResult, NodeSchema, Output, String

CATEGORY = "testing"


class LoomTestValue(Node):
    schema = NodeSchema("LoomTestValue", (Int("value", 0, min=-1000, max=1000),),
                        (Output("INT"),), category=CATEGORY)

    def execute(self, ctx: NodeContext, value: int) -> tuple[int]:
        return (value,)


class LoomTestIncrement(Node):
    schema = NodeSchema("LoomTestIncrement", (Link("value", "INT"),), (Output("INT"),),
                        category=CATEGORY)

    def execute(self, ctx: NodeContext, value: int) -> tuple[int]:
        return (value + 1,)


class LoomTestSlow(Node):
    """Sleeps `delay` seconds per step and reports each step; stops when interrupted."""

    schema = NodeSchema("LoomTestSlow", (Link("value", "INT"), Int("steps", 3, min=1, max=1000),
                                         Float("delay", 0.05, min=0.0, max=10.0)),
                        (Output("INT"),), category=CATEGORY)

    def execute(self, ctx: NodeContext, value: int, steps: int, delay: float) -> tuple[int]:
        for step in range(steps):
            time.sleep(delay)
            ctx.progress(step + 1, steps, Image.new("RGB", (16, 16), (step * 20, 0, 0)))
        return (value,)


class LoomTestShow(Node):
    schema = NodeSchema("LoomTestShow", (Link("value", "INT"), String("label", default="value")),
                        category=CATEGORY, output_node=True)

    def execute(self, ctx: NodeContext, value: int, label: str) -> NodeResult:
        return NodeResult(ui={"text": [f"{label}={value}"]})


class LoomTestFail(Node):
    schema = NodeSchema("LoomTestFail", (Link("value", "INT"),), (Output("INT"),),
                        category=CATEGORY)

    def execute(self, ctx: NodeContext, value: int) -> tuple[int]:
        raise RuntimeError("deliberate failure")


NODE_CLASS_MAPPINGS = {node.schema.name: node for node in
                       (LoomTestValue, LoomTestIncrement, LoomTestSlow, LoomTestShow,
                        LoomTestFail)}
