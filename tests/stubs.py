"""Small stub nodes and an engine factory for in-process graph tests."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.cache import OutputCache
from engine.context import NodeContext, Services
from engine.events import RecordingListener
from engine.executor import ExecutionResult, Executor
from engine.node import (
    ALWAYS_CHANGED,
    Combo,
    Float,
    Int,
    Link,
    Node,
    NodeResult,
    NodeSchema,
    Output,
    String,
)
from engine.paths import Paths
from engine.registry import NodeRegistry
from engine.validation import ValidationResult, validate_prompt


class Const(Node):
    schema = NodeSchema("Const", (Int("value", 0, min=-1000, max=1000),), (Output("INT"),))

    def execute(self, ctx: NodeContext, value: int) -> tuple[int]:
        return (value,)


class Add(Node):
    schema = NodeSchema("Add", (Link("a", "INT"), Link("b", "INT")), (Output("INT"),))

    def execute(self, ctx: NodeContext, a: int, b: int) -> tuple[int]:
        return (a + b,)


class Parity(Node):
    """Outputs value % 2: used to show early cutoff (3 -> 5 gives the same output)."""

    schema = NodeSchema("Parity", (Link("x", "INT"),), (Output("INT"),))

    def execute(self, ctx: NodeContext, x: int) -> tuple[int]:
        return (x % 2,)


class Scale(Node):
    schema = NodeSchema("Scale", (Link("x", "INT"), Float("factor", 1.0, min=0.0, max=10.0),
                                  Combo("mode", ("round", "floor"), default="round")),
                        (Output("FLOAT"),))

    def execute(self, ctx: NodeContext, x: int, factor: float, mode: str) -> tuple[float]:
        return (float(round(x * factor)) if mode == "round" else float(int(x * factor)),)


class Text(Node):
    schema = NodeSchema("Text", (String("text", default=""),), (Output("STRING"),))

    def execute(self, ctx: NodeContext, text: str) -> tuple[str]:
        return (text,)


class Show(Node):
    schema = NodeSchema("Show", (Link("x", "*"),), output_node=True)

    def execute(self, ctx: NodeContext, x: Any) -> NodeResult:
        return NodeResult(ui={"text": [repr(x)]})


class Fail(Node):
    schema = NodeSchema("Fail", (Link("x", "INT"),), (Output("INT"),))

    def execute(self, ctx: NodeContext, x: int) -> tuple[int]:
        raise RuntimeError(f"deliberate failure on {x}")


class Steps(Node):
    """Reports `steps` progress ticks, waiting `delay` seconds on each."""

    schema = NodeSchema("Steps", (Link("x", "INT"), Int("steps", 3, min=1, max=1000),
                                  Float("delay", 0.0, min=0.0, max=10.0)), (Output("INT"),))

    def execute(self, ctx: NodeContext, x: int, steps: int, delay: float) -> tuple[int]:
        for step in range(1, steps + 1):
            time.sleep(delay)
            ctx.progress(step, steps)
        return (x,)


class Range(Node):
    """Outputs a list: 0..count-1 (ComfyUI OUTPUT_IS_LIST)."""

    schema = NodeSchema("Range", (Int("count", 3, min=0, max=100),),
                        (Output("INT", is_list=True),))

    def execute(self, ctx: NodeContext, count: int) -> tuple[list[int]]:
        return (list(range(count)),)


class Total(Node):
    """Receives whole lists (ComfyUI INPUT_IS_LIST) and sums them."""

    schema = NodeSchema("Total", (Link("x", "INT"),), (Output("INT"),), input_is_list=True)

    def execute(self, ctx: NodeContext, x: list[int]) -> tuple[int]:
        return (sum(x),)


class Switch(Node):
    """Lazy: evaluates only the branch `pick` selects."""

    schema = NodeSchema("Switch", (Combo("pick", ("a", "b"), default="a"),
                                   Link("a", "INT", lazy=True), Link("b", "INT", lazy=True)),
                        (Output("INT"),))

    def check_lazy(self, ctx: NodeContext, **inputs: Any) -> list[str]:
        wanted = inputs["pick"]
        return [wanted] if inputs.get(wanted) is None else []

    def execute(self, ctx: NodeContext, pick: str, a: Any = None, b: Any = None) -> tuple[int]:
        return (a if pick == "a" else b,)


@dataclass
class Counter:
    calls: int = 0


class Random(Node):
    """Not idempotent: its results are never reused by a later prompt."""

    schema = NodeSchema("Random", (Int("seed", 0, min=0, max=10),), (Output("INT"),),
                        idempotent=False)

    def execute(self, ctx: NodeContext, seed: int) -> tuple[int]:
        return (seed,)


class Volatile(Node):
    """Fingerprint says 'always changed' (ComfyUI IS_CHANGED -> NaN)."""

    schema = NodeSchema("Volatile", (Int("value", 0, min=0, max=10),), (Output("INT"),))

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        return ALWAYS_CHANGED

    def execute(self, ctx: NodeContext, value: int) -> tuple[int]:
        return (value,)


class Even(Node):
    """Custom validation: the value must be even."""

    schema = NodeSchema("Even", (Int("value", 0, min=0, max=100),), (Output("INT"),))

    def validate(self, ctx: NodeContext, **inputs: Any) -> tuple[str, str] | None:
        return None if inputs["value"] % 2 == 0 else ("value", f"{inputs['value']} is odd")

    def execute(self, ctx: NodeContext, value: int) -> tuple[int]:
        return (value,)


class BadFingerprint(Node):
    """Its fingerprint raises, like a file-reading node whose file vanished."""

    schema = NodeSchema("BadFingerprint", (Int("value", 0, min=0, max=10),), (Output("INT"),))

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        raise OSError("file vanished")

    def execute(self, ctx: NodeContext, value: int) -> tuple[int]:
        return (value,)


class Stamped(Node):
    """Fingerprinted like a file-reading node: by the number in input/stamp.txt (0 if none)."""

    schema = NodeSchema("Stamped", (Int("value", 0, min=0, max=10),), (Output("INT"),))

    @staticmethod
    def stamp(ctx: NodeContext) -> int:
        path = ctx.paths.input / "stamp.txt"
        return int(path.read_text()) if path.exists() else 0

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        return self.stamp(ctx)

    def execute(self, ctx: NodeContext, value: int) -> tuple[int]:
        return (value + self.stamp(ctx),)


STUB_TYPES = (BadFingerprint, Const, Add, Parity, Scale, Text, Show, Fail, Steps, Range, Total,
              Switch, Random, Volatile, Even, Stamped)


class Engine:
    """A registry + executor over the stub nodes, with helpers to run API prompts."""

    def __init__(self, tmp_path: Path, cache: OutputCache | None = None) -> None:
        self.registry = NodeRegistry()
        self.registry.register_all(STUB_TYPES)
        self.services = Services(Paths.from_base(tmp_path))
        self.executor = Executor(self.registry, self.services, cache)

    def validate(self, api: dict[str, Any]) -> ValidationResult:
        return validate_prompt(api, self.registry, self.services)

    def run(self, api: dict[str, Any], listener: RecordingListener | None = None,
            ) -> tuple[ExecutionResult, RecordingListener]:
        checked = self.validate(api)
        assert checked.error is None and not checked.node_errors, checked.to_json()
        listener = listener if listener is not None else RecordingListener()
        return self.executor.execute(checked.prompt, checked.outputs, listener=listener), listener

    def run_in_thread(self, api: dict[str, Any]) -> tuple[threading.Thread, dict[str, Any]]:
        """Run in a thread; box["listener"] records events live, box["result"] at the end."""
        box: dict[str, Any] = {"listener": RecordingListener()}

        def target() -> None:
            box["result"], _ = self.run(api, box["listener"])

        thread = threading.Thread(target=target)
        thread.start()
        return thread, box


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    """An API-format node body."""
    return {"class_type": class_type, "inputs": inputs}
