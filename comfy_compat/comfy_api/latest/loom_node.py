"""A V3 ComfyNode as a Loom node type: the schema converted once, calls delegated to the
class's classmethods with `cls.hidden` set per run and MODEL/CLIP/VAE converted both ways."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from comfy_api.latest.io import ComfyNode, Hidden, HiddenHolder, NodeOutput, Schema
from engine.classic import blocked_result, execution_blocker, expansion_results
from engine.comfy_host import from_pack, running, to_pack
from engine.context import NodeContext
from engine.dynamic_inputs import group_dynamic_inputs
from engine.node import ALWAYS_CHANGED, Input, Node, NodeResult, NodeSchema

HIDDEN_PREFIX = "loom_hidden_"  # hidden inputs' names, kept apart from the node's own inputs


class V3NodeError(ValueError):
    """A V3 node whose schema or result cannot be used."""


def _await(value: Any) -> Any:
    """Run a coroutine (ComfyUI allows async execute and entrypoints) to its result."""
    return asyncio.run(value) if inspect.iscoroutine(value) else value


def loom_schema(cls: type[ComfyNode], schema: Schema) -> NodeSchema:
    if not isinstance(schema, Schema):
        raise V3NodeError(f"{cls.__name__}.define_schema() returned {type(schema).__name__}; "
                          f"return io.Schema(node_id=..., inputs=[...], outputs=[...])")
    inputs = [spec.loom_input() for spec in schema.inputs]
    inputs += [Input(HIDDEN_PREFIX + Hidden(kind).name, Hidden(kind).value, hidden=True)
               for kind in schema.hidden]
    return NodeSchema(
        name=schema.node_id, inputs=tuple(inputs),
        outputs=tuple(spec.loom_output() for spec in schema.outputs),
        category=schema.category, display_name=schema.display_name,
        description=schema.description, output_node=schema.is_output_node,
        idempotent=not schema.not_idempotent, input_is_list=schema.is_input_list,
        deprecated=schema.is_deprecated, experimental=schema.is_experimental,
        python_module=f"custom_nodes.{cls.__module__}")


class V3Node(Node):
    """Base of adapted V3 classes."""

    comfy: type[ComfyNode]

    def _prepared(self, ctx: NodeContext, inputs: dict[str, Any]) -> tuple[type, dict[str, Any]]:
        """A per-run subclass carrying `hidden`, and the node's own inputs."""
        hidden = {name[len(HIDDEN_PREFIX):]: value for name, value in inputs.items()
                  if name.startswith(HIDDEN_PREFIX)}
        if "unique_id" in hidden and hidden["unique_id"] is None:
            hidden["unique_id"] = ctx.node_id
        own = {name: to_pack(value) for name, value in inputs.items()
               if not name.startswith(HIDDEN_PREFIX)}
        if self.schema.has_dynamic:  # each DynamicCombo/Autogrow arrives as one dict
            own = group_dynamic_inputs(self.schema, own)
        clone = type(self.comfy.__name__, (self.comfy,), {"hidden": HiddenHolder(hidden),
                                                          "__module__": self.comfy.__module__})
        return clone, own

    def execute(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        blocker = execution_blocker(inputs.values())
        if blocker is not None:
            return blocked_result(self.schema, blocker)
        clone, own = self._prepared(ctx, inputs)
        with running(ctx):
            returned = _await(clone.execute(**own))
        return self._result(returned)

    def _result(self, returned: Any) -> NodeResult:
        name = self.schema.name
        if isinstance(returned, tuple):
            returned = NodeOutput(*returned)
        if not isinstance(returned, NodeOutput):
            raise V3NodeError(f"node {name!r}: execute() returned {type(returned).__name__}; "
                              f"return io.NodeOutput(value, ...)")
        if returned.block_execution is not None:
            from comfy_execution.graph import ExecutionBlocker
            blocker = ExecutionBlocker(returned.block_execution)
            return NodeResult((blocker,) * len(self.schema.outputs), None)
        count = len(self.schema.outputs)  # ComfyUI indexes the values: extras cut, missing None
        values = tuple(returned.args[:count]) + (None,) * (count - len(returned.args))
        ui = returned.ui.as_dict() if hasattr(returned.ui, "as_dict") else returned.ui
        if returned.expand is not None:
            values = expansion_results(values)
        return NodeResult(tuple(from_pack(v) for v in values), ui, returned.expand)

    def validate(self, ctx: NodeContext, **inputs: Any) -> str | None:
        clone, own = self._prepared(ctx, inputs)
        verdict = _await(clone.validate_inputs(**own))
        return None if verdict is True else str(verdict)

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        clone, own = self._prepared(ctx, inputs)
        value = _await(clone.fingerprint_inputs(**own))
        return ALWAYS_CHANGED if isinstance(value, float) and value != value else value

    def check_lazy(self, ctx: NodeContext, **inputs: Any) -> list[str]:
        clone, own = self._prepared(ctx, inputs)
        return list(_await(clone.check_lazy_status(**own)) or ())


def v3_node_type(cls: type[ComfyNode]) -> type[Node]:
    """A Loom node type whose schema is `cls.define_schema()` and whose calls go to `cls`."""
    schema = loom_schema(cls, cls.define_schema())
    namespace: dict[str, Any] = {"schema": schema, "comfy": cls, "__module__": cls.__module__,
                                 "__doc__": f"V3 node {schema.name} ({cls.__qualname__})."}
    # hooks the class lacks stay the base no-ops, so the engine knows to skip them
    for hook, method in (("validate_inputs", "validate"), ("fingerprint_inputs", "fingerprint"),
                         ("check_lazy_status", "check_lazy")):
        if not hasattr(cls, hook):
            namespace[method] = getattr(Node, method)
    return type(f"V3_{cls.__name__}", (V3Node,), namespace)
