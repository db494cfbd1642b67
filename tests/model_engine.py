"""An engine with the built-in nodes and a model manager over a temporary base folder, with
tiny random checkpoints written where the loaders look for them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.context import NodeContext, Services
from engine.diffusion.checkpoints.writer import write_random_checkpoint
from engine.diffusion.memory.devices import DevicePolicy
from engine.diffusion.memory.model_manager import ModelManager
from engine.events import RecordingListener
from engine.executor import ExecutionResult, Executor
from engine.node import Link, Node, NodeResult, NodeSchema
from engine.paths import Paths
from engine.registry import NodeRegistry
from engine.validation import validate_prompt
from nodes import builtin_node_types


class Probe(Node):
    """A test output node that takes any value, so the nodes feeding it run."""

    schema = NodeSchema("Probe", (Link("value", "*"),), output_node=True)

    def execute(self, ctx: NodeContext, value: Any) -> NodeResult:
        return NodeResult(ui={"probed": [type(value).__name__]})


class ModelEngine:
    """Built-in nodes + fp32 CPU model manager; `checkpoint(kind)` writes a tiny model."""

    def __init__(self, base: Path, policy: DevicePolicy | None = None) -> None:
        self.base = base
        self.registry = NodeRegistry()
        self.registry.register_all([*builtin_node_types(), Probe])
        policy = policy or DevicePolicy.decide(cpu=True, force_fp32=True)
        self.services = Services(Paths.from_base(base),
                                 model_manager=ModelManager(policy))
        self.executor = Executor(self.registry, self.services)

    def checkpoint(self, kind: str, name: str | None = None, seed: int = 0) -> str:
        name = name or f"tiny_{kind}.safetensors"
        write_random_checkpoint(self.base / "models" / "checkpoints" / name, kind, seed=seed)
        return name

    def run(self, api: dict[str, Any], extra_data: dict[str, Any] | None = None,
            ) -> tuple[ExecutionResult, RecordingListener]:
        checked = validate_prompt(api, self.registry, self.services)
        assert checked.error is None and not checked.node_errors, checked.to_json()
        listener = RecordingListener()
        result = self.executor.execute(checked.prompt, checked.outputs, listener=listener,
                                       extra_data=extra_data)
        assert result.ok, result.error
        return result, listener


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    """An API-format node body."""
    return {"class_type": class_type, "inputs": inputs}


def probed(api: dict[str, Any], *node_ids: str) -> dict[str, Any]:
    """`api` plus a Probe on output 0 of each node id, so they run."""
    extra = {f"probe_{n}": node("Probe", value=[n, 0]) for n in node_ids}
    return {**api, **extra}
