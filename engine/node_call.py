"""Calling a node with ComfyUI's list semantics: every input arrives as a list of values; the
node is called once per list index (shorter lists repeat their last value), or once with the
whole lists when it declares INPUT_IS_LIST. Each call's return value is checked against the
node's declared outputs, and the results are merged per output slot; the graphs of the calls
that expanded (NodeResult.expand) are returned beside them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.context import NodeContext
from engine.node import ExpansionLink, Node, NodeResult, NodeSchema

Outputs = list[list[Any]]  # per output slot, the list of values
Graphs = list[Mapping[str, Any]]  # the graphs a node's calls expanded into, in call order
Called = tuple[Outputs, dict[str, Any] | None, Graphs]


def call_once(instance: Node, ctx: NodeContext, schema: NodeSchema,
              kwargs: dict[str, Any]) -> Called:
    """The common case: one call with one value per input."""
    ctx.call_index = 0
    values, ui, graph = normalise(instance.execute(ctx, **kwargs), schema)
    outputs = [_slot_values(declared.is_list, value)
               for declared, value in zip(schema.outputs, values, strict=True)]
    return outputs, (None if ui is None else merge_ui(None, ui)), [] if graph is None else [graph]


def _slot_values(is_list: bool, value: Any) -> list[Any]:
    """One call's values of an output slot (a link into an expansion stands for its values)."""
    return list(value) if is_list and not isinstance(value, ExpansionLink) else [value]


def call_node(instance: Node, ctx: NodeContext, schema: NodeSchema,
              inputs: dict[str, list[Any]]) -> Called:
    """Call the node once (INPUT_IS_LIST) or once per list index, and merge the results."""
    if not schema.input_is_list and all(len(values) == 1 for values in inputs.values()):
        # the executor has just checked for an interrupt before this node
        return call_once(instance, ctx, schema, {name: vals[0] for name, vals in inputs.items()})
    if schema.input_is_list:
        calls = [inputs]
    else:
        count = max((len(v) for v in inputs.values()), default=1)
        if any(len(v) == 0 for v in inputs.values()):
            count = 0
        calls = [{name: values[min(i, len(values) - 1)] for name, values in inputs.items()}
                 for i in range(count)]
    outputs: Outputs = [[] for _ in schema.outputs]
    ui: dict[str, Any] | None = None
    graphs: Graphs = []
    for index, kwargs in enumerate(calls):
        ctx.check_interrupted()
        ctx.call_index = index
        values, call_ui, graph = normalise(instance.execute(ctx, **kwargs), schema)
        for slot, (declared, value) in enumerate(zip(schema.outputs, values, strict=True)):
            outputs[slot].extend(_slot_values(declared.is_list, value))
        if call_ui is not None:
            ui = merge_ui(ui, call_ui)
        if graph is not None:
            graphs.append(graph)
    return outputs, ui, graphs


def normalise(returned: Any, schema: NodeSchema
              ) -> tuple[tuple[Any, ...], dict | None, Mapping[str, Any] | None]:
    """A node's return value as (one value per declared output, UI dict or None, the graph it
    expands into or None)."""
    graph = None
    if isinstance(returned, NodeResult):
        values, ui, graph = tuple(returned.outputs), returned.ui, returned.expand
    elif returned is None:
        values, ui = (), None
    elif isinstance(returned, tuple):
        values, ui = returned, None
    else:
        raise TypeError(f"{schema.name}.execute returned {type(returned).__name__}; return a "
                        f"tuple with one value per output or a NodeResult")
    if len(values) != len(schema.outputs):
        raise TypeError(f"{schema.name}.execute returned {len(values)} value(s) but the node "
                        f"declares {len(schema.outputs)} output(s)")
    return values, ui, graph


def merge_ui(merged: dict[str, Any] | None, ui: dict[str, Any]) -> dict[str, Any]:
    """Add one call's UI dict to those of the earlier calls (lists are concatenated)."""
    if merged is None:
        return {key: list(value) if isinstance(value, (list, tuple)) else value
                for key, value in ui.items()}
    for key, value in ui.items():
        if isinstance(value, (list, tuple)) and isinstance(merged.get(key), list):
            merged[key].extend(value)
        else:
            merged[key] = value
    return merged


def format_input_values(values: list[Any]) -> list[Any]:
    """Input values as execution_error's current_inputs shows them (short, JSON-safe)."""
    shown = []
    for value in values:
        if isinstance(value, (str, int, float, bool, type(None))):
            shown.append(value)
        elif hasattr(value, "shape") and hasattr(value, "dtype"):
            shown.append(f"<{type(value).__name__} shape={tuple(value.shape)} {value.dtype}>")
        else:
            text = repr(value)
            shown.append(text if len(text) <= 200 else text[:197] + "...")
    return shown
