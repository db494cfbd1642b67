"""The editor ("UI") graph as one flat id space: subgraphs expanded, links traced to real producers.

What the subgraph format looks like, learned from editor-saved workflows and the official
template workflows (editor 1.2x to 1.5x):

- `definitions.subgraphs` is a list of `{id: <uuid>, name, inputNode: {id: -10, bounding},
  outputNode: {id: -20, bounding}, inputs: [{id, name, type, linkIds, ...}], outputs: [same],
  widgets: [], nodes: [...], links: [{id, origin_id, origin_slot, target_id, target_slot, type}]}`.
- An instance is a node whose `type` is a definition id. Its `inputs` are a subset of the
  definition's inputs, matched by name; its `outputs` line up with the definition's by index.
- Inside a definition, a link from origin_id -10 slot k reads the instance's k-th definition
  input, and a link into target_id -20 slot k feeds the instance's k-th output. Stale duplicate
  links into -20 occur; the output's `linkIds` names the live ones.
- The API prompt names inner nodes "<instance id>:<inner id>", nested ones "5:3:2".
- Promoted widgets: older editors keep one value per definition input that feeds an inner widget,
  in definition order, in the instance's `widgets_values`. Newer ones list
  `properties.proxyWidgets` as `[[inner id, or "-1" for a definition input, widget name], ...]`
  and normally leave `widgets_values` empty, the values staying on the inner nodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SUBGRAPH_INPUT_ID = -10
SUBGRAPH_OUTPUT_ID = -20
MUTED_MODE = 2  # litegraph's NEVER: the node and everything it produces are left out
BYPASS_MODE = 4  # the node is skipped; its inputs pass straight through to its consumers
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
REROUTE_TYPE = "Reroute"
PRIMITIVE_TYPE = "PrimitiveNode"


class WorkflowFormatError(ValueError):
    """A workflow that is structurally broken, or in neither the API nor the editor format."""


@dataclass(frozen=True)
class Slot:
    """One end of a link in the flat graph: a node id and an input or output index."""

    node_id: str
    index: int


@dataclass(frozen=True)
class Literal:
    """A constant that stands in for a link (a PrimitiveNode's value, a promoted widget)."""

    value: Any


@dataclass(frozen=True)
class Edge:
    """A link as its consumer sees it: the producing slot and the consumer input's type."""

    source: Slot
    type: str


@dataclass(frozen=True)
class _Continue:
    """Keep tracing from the link that feeds `target`."""

    target: Slot


@dataclass(frozen=True)
class WidgetSpec:
    """One widget in editor order; `has_control` marks a seed widget's trailing control value.

    `branches` (a V3 DynamicCombo): for each choice, the widgets the editor inserts right after
    this one when that choice is selected."""

    name: str
    value_type: str
    has_control: bool = False
    branches: Mapping[str, tuple[WidgetSpec, ...]] | None = field(default=None, compare=False)


@dataclass
class BoundaryInput:
    """A subgraph instance's input side, seen from inside the definition as node -10."""

    instance_id: str
    instance_slots: dict[int, int]  # definition input index -> instance input index
    values: dict[int, Any]  # definition input index -> promoted widget value


@dataclass
class FlatNode:
    """A node of the flattened graph, its saved dict kept as is."""

    node_id: str
    raw: Mapping[str, Any]
    is_instance: bool = False
    boundary: BoundaryInput | None = None
    widget_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return str(self.raw.get("type", ""))

    @property
    def mode(self) -> int:
        mode = self.raw.get("mode", 0)
        return mode if isinstance(mode, int) else 0

    @property
    def inputs(self) -> list[Mapping[str, Any]]:
        """Input slots by index; a malformed slot reads as empty so indices stay aligned."""
        return [slot if isinstance(slot, Mapping) else {} for slot in self.raw.get("inputs") or []]

    def is_emitted(self) -> bool:
        """Whether the node becomes a node of the API prompt."""
        virtual = self.type in NOTE_TYPES or self.type in (REROUTE_TYPE, PRIMITIVE_TYPE)
        skipped = self.mode in (MUTED_MODE, BYPASS_MODE)
        return not (virtual or skipped or self.is_instance or self.boundary)


@dataclass
class FlatGraph:
    """Every node by flat id, and every live link keyed by the input it feeds."""

    nodes: dict[str, FlatNode] = field(default_factory=dict)
    edges: dict[Slot, Edge] = field(default_factory=dict)
    consumers: dict[Slot, list[Slot]] = field(default_factory=dict)  # source -> inputs it feeds

    def add_edge(self, target: Slot, edge: Edge) -> None:
        self.edges[target] = edge
        self.consumers.setdefault(edge.source, []).append(target)


def schema_inputs(schema: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(name, declaration) of a class's inputs in editor order: required, then optional."""
    inputs = schema.get("input") or {}
    orders = schema.get("input_order") or {}
    found = []
    for section in ("required", "optional"):
        declared = inputs.get(section) or {}
        found.extend((name, declared.get(name)) for name in orders.get(section) or list(declared))
    return found


def assign_widget_values(values: Sequence[Any], specs: Sequence[WidgetSpec]) -> dict[str, Any]:
    """Map positional `widgets_values` to widget names, skipping seed control values."""
    assigned: dict[str, Any] = {}
    pending = list(specs)
    position = index = 0
    while index < len(pending) and position < len(values):
        spec = pending[index]
        index += 1
        assigned[spec.name] = values[position]
        position += 1
        if spec.branches is not None:  # the chosen option's widgets come next
            pending[index:index] = spec.branches.get(assigned[spec.name], ())
        spare = (len(values) - position) - (len(pending) - index)
        following = values[position] if position < len(values) else None
        undeclared = spec.value_type == "INT" and spare > 0  # the editor adds one to any seed
        if _is_control(following) and (spec.has_control or undeclared):
            position += 1
        elif isinstance(following, bool) and spec.has_control and spare > 0:
            position += 1  # editors before the combo saved "randomize after every gen" on/off
    return assigned


def _is_control(value: Any) -> bool:
    return isinstance(value, str) and value in CONTROL_VALUES


def flatten_workflow(workflow: Any) -> FlatGraph:
    """Parse an editor workflow into a FlatGraph, expanding every live subgraph instance."""
    if not isinstance(workflow, Mapping):
        raise WorkflowFormatError(
            f"an editor workflow must be a JSON object, got {type(workflow).__name__}")
    graph = FlatGraph()
    _add_graph(graph, workflow, "", _definitions(workflow), ())
    return graph


def _definitions(workflow: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    definitions = workflow.get("definitions") or {}
    subgraphs = definitions.get("subgraphs") if isinstance(definitions, Mapping) else None
    if subgraphs is None:
        return {}
    if not isinstance(subgraphs, list):
        raise WorkflowFormatError(
            f"definitions.subgraphs must be a list, got {type(subgraphs).__name__}")
    found = {}
    for index, subgraph in enumerate(subgraphs):
        if not isinstance(subgraph, Mapping) or not isinstance(subgraph.get("id"), str):
            raise WorkflowFormatError(
                f"definitions.subgraphs[{index}] needs a string 'id' (the uuid instances use "
                "as their type)")
        found[subgraph["id"]] = subgraph
    return found


def _add_graph(graph: FlatGraph, body: Mapping[str, Any], prefix: str,
               definitions: Mapping[str, Mapping[str, Any]], stack: tuple[str, ...]) -> None:
    where = f"subgraph {stack[-1]!r}" if stack else "workflow"
    nodes = body.get("nodes")
    if not isinstance(nodes, list):
        raise WorkflowFormatError(
            f"{where}: 'nodes' must be a list of node objects, got {type(nodes).__name__}")
    added = [_add_node(graph, raw, index, prefix, where) for index, raw in enumerate(nodes)]
    outputs = body.get("outputs") if stack else None
    for link in _links(body, where):
        _add_edge(graph, link, prefix, outputs if isinstance(outputs, list) else [])
    for node in added:
        definition = definitions.get(node.type)
        if definition is not None and node.mode not in (MUTED_MODE, BYPASS_MODE):
            _expand_instance(graph, node, definition, definitions, stack)


def _add_node(graph: FlatGraph, raw: Any, index: int, prefix: str, where: str) -> FlatNode:
    if not isinstance(raw, Mapping):
        raise WorkflowFormatError(f"{where}: nodes[{index}] must be an object, got {raw!r}")
    node_id = _id_text(raw.get("id"), f"{where}: nodes[{index}].id")
    if not isinstance(raw.get("type"), str):
        raise WorkflowFormatError(f"{where}: node {node_id} has no string 'type'")
    if not isinstance(raw.get("inputs") or [], list):
        raise WorkflowFormatError(f"{where}: node {node_id} 'inputs' must be a list")
    flat_id = prefix + node_id
    if flat_id in graph.nodes:
        raise WorkflowFormatError(f"{where}: node id {node_id} is used twice; ids must be unique")
    node = FlatNode(flat_id, raw)
    graph.nodes[flat_id] = node
    return node


def _id_text(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise WorkflowFormatError(f"{where} must be an integer or string id, got {value!r}")
    return str(value)


_LINK_FIELDS = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")


def _links(body: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    """Links as dicts, from either the array form or the object form."""
    links = body.get("links") or []
    if not isinstance(links, list):
        raise WorkflowFormatError(f"{where}: 'links' must be a list, got {type(links).__name__}")
    parsed = []
    for index, link in enumerate(links):
        if link is None:  # old editors leave holes where a link was deleted
            continue
        if isinstance(link, (list, tuple)) and len(link) >= 5:
            link = dict(zip(_LINK_FIELDS, link, strict=False))  # the type may be left out
        if not isinstance(link, Mapping) or not all(key in link for key in _LINK_FIELDS[1:5]):
            raise WorkflowFormatError(
                f"{where}: links[{index}] must be [id, from_node, from_slot, to_node, to_slot, "
                f"type] or an object with origin_id/origin_slot/target_id/target_slot, "
                f"got {link!r}")
        parsed.append(dict(link))
    return parsed


def _add_edge(graph: FlatGraph, link: Mapping[str, Any], prefix: str,
              outputs: list[Any]) -> None:
    """Record one link unless it is stale (its target no longer names it) or dangling."""
    origin, target = link["origin_id"], link["target_id"]
    origin_slot, target_slot = link["origin_slot"], link["target_slot"]
    if not isinstance(origin_slot, int) or not isinstance(target_slot, int):
        return
    link_type = str(link.get("type") or "*")
    if target == SUBGRAPH_OUTPUT_ID:
        output = outputs[target_slot] if 0 <= target_slot < len(outputs) else {}
        live = output.get("linkIds") if isinstance(output, Mapping) else None
        if isinstance(live, list) and live and link.get("id") not in live:
            return
        target_key = Slot(f"{prefix}{SUBGRAPH_OUTPUT_ID}", target_slot)
    else:
        consumer = graph.nodes.get(prefix + str(target))
        if consumer is None:
            return
        slots = consumer.inputs
        slot = slots[target_slot] if 0 <= target_slot < len(slots) else None
        if slot:
            if "link" in slot and slot["link"] != link.get("id"):
                return
            link_type = str(slot.get("type") or link_type)
        target_key = Slot(consumer.node_id, target_slot)
    if target_key not in graph.edges:
        graph.add_edge(target_key, Edge(Slot(prefix + str(origin), origin_slot), link_type))


def _expand_instance(graph: FlatGraph, instance: FlatNode, definition: Mapping[str, Any],
                     definitions: Mapping[str, Mapping[str, Any]],
                     stack: tuple[str, ...]) -> None:
    if instance.type in stack:
        chain = " -> ".join((*stack, instance.type))
        raise WorkflowFormatError(
            f"subgraph {instance.type!r} contains itself ({chain}); remove the nested instance")
    instance.is_instance = True
    prefix = f"{instance.node_id}:"
    _add_graph(graph, definition, prefix, definitions, (*stack, instance.type))
    def_inputs = [slot for slot in definition.get("inputs") or [] if isinstance(slot, Mapping)]
    by_name = {slot.get("name"): index for index, slot in enumerate(instance.inputs)}
    instance_slots = {index: by_name[slot.get("name")]
                      for index, slot in enumerate(def_inputs) if slot.get("name") in by_name}
    values = _promoted_values(graph, instance, def_inputs, prefix)
    boundary_id = f"{prefix}{SUBGRAPH_INPUT_ID}"
    graph.nodes[boundary_id] = FlatNode(
        boundary_id, {"id": SUBGRAPH_INPUT_ID, "type": "SubgraphInput"},
        boundary=BoundaryInput(instance.node_id, instance_slots, values))


def _promoted_values(graph: FlatGraph, instance: FlatNode, def_inputs: list[Mapping[str, Any]],
                     prefix: str) -> dict[int, Any]:
    """Values the instance holds for its definition inputs; proxy values go onto inner nodes."""
    saved = instance.raw.get("widgets_values")
    index_of = {slot.get("name"): index for index, slot in enumerate(def_inputs)}
    if isinstance(saved, Mapping):
        return {index_of[name]: value for name, value in saved.items() if name in index_of}
    if not isinstance(saved, list) or not saved:
        return {}
    proxies = (instance.raw.get("properties") or {}).get("proxyWidgets")
    if isinstance(proxies, list) and proxies:
        return _proxy_values(graph, proxies, saved, index_of, prefix)
    widget_inputs = [index for index, slot in enumerate(def_inputs)
                     if _feeds_widget(graph, prefix, index)]
    specs = [WidgetSpec(str(index), str(def_inputs[index].get("type"))) for index in widget_inputs]
    return {int(key): value for key, value in assign_widget_values(saved, specs).items()}


def _feeds_widget(graph: FlatGraph, prefix: str, input_index: int) -> bool:
    """Whether definition input `input_index` is wired to an inner widget (so it has a value)."""
    source = Slot(f"{prefix}{SUBGRAPH_INPUT_ID}", input_index)
    for target in graph.consumers.get(source, ()):
        node = graph.nodes.get(target.node_id)
        slots = node.inputs if node else []
        if target.index < len(slots) and slots[target.index].get("widget"):
            return True
    return False


def _proxy_values(graph: FlatGraph, proxies: list[Any], saved: list[Any],
                  index_of: Mapping[Any, int], prefix: str) -> dict[int, Any]:
    """Apply `widgets_values` laid out like proxyWidgets; ignored when the lengths disagree."""
    if len(proxies) != len(saved):
        return {}
    values: dict[int, Any] = {}
    for proxy, value in zip(proxies, saved, strict=True):
        if not isinstance(proxy, (list, tuple)) or len(proxy) != 2:
            continue
        if proxy[1] == "control_after_generate":
            continue
        owner, name = str(proxy[0]), proxy[1]
        inner = graph.nodes.get(prefix + owner)
        if owner == "-1" and name in index_of:
            values[index_of[name]] = value
        elif inner is not None and not inner.is_instance:
            inner.widget_overrides[name] = value
    return values


def resolve_source(graph: FlatGraph, target: Slot) -> Slot | Literal | None:
    """The real producer of the input `target`, through reroutes, bypasses and subgraphs."""
    edge = graph.edges.get(target)
    wanted_type = edge.type if edge else "*"
    seen: set[Slot] = set()
    while edge is not None:
        if target in seen:
            raise WorkflowFormatError(
                f"links loop through reroute/bypassed nodes at node {target.node_id}; "
                "break the loop in the editor")
        seen.add(target)
        step = _step(graph, edge.source, wanted_type)
        if not isinstance(step, _Continue):
            return step
        target = step.target
        edge = graph.edges.get(target)
    return None


def _step(graph: FlatGraph, source: Slot, wanted_type: str) -> Slot | Literal | _Continue | None:
    node = graph.nodes.get(source.node_id)
    if node is None or node.type in NOTE_TYPES:
        return None
    if node.type == PRIMITIVE_TYPE:
        saved = node.raw.get("widgets_values")
        first = next(iter(saved.values() if isinstance(saved, Mapping) else saved or []), None)
        return Literal(first) if saved else None
    if node.type == REROUTE_TYPE:
        return _Continue(Slot(node.node_id, 0))
    if node.mode == BYPASS_MODE:
        index = _bypass_input(node, source.index, wanted_type)
        return None if index is None else _Continue(Slot(node.node_id, index))
    if node.mode == MUTED_MODE:
        return None
    if node.is_instance:
        return _Continue(Slot(f"{node.node_id}:{SUBGRAPH_OUTPUT_ID}", source.index))
    if node.boundary is not None:
        return _boundary_step(graph, node.boundary, source.index)
    return source


def _bypass_input(node: FlatNode, output_index: int, wanted_type: str) -> int | None:
    """The input a bypassed node passes through: same index if its type fits, else the first fit."""
    inputs = node.inputs
    for index in (output_index, *range(len(inputs))):
        if 0 <= index < len(inputs) and inputs[index].get("type") == wanted_type:
            return index
    return None


def _boundary_step(graph: FlatGraph, boundary: BoundaryInput,
                   input_index: int) -> Literal | _Continue | None:
    slot = boundary.instance_slots.get(input_index)
    if slot is not None and Slot(boundary.instance_id, slot) in graph.edges:
        return _Continue(Slot(boundary.instance_id, slot))
    if input_index in boundary.values:
        return Literal(boundary.values[input_index])
    return None
