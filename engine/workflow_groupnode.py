"""Legacy editor group nodes expanded into their inner nodes, before the editor graph is flattened.

What the format looks like, learned from editor-saved workflows (2023-24 editors) and the
frontend's group node extension:

- `extra.groupNodes[<name>] = {nodes, links, external, config?}`. `nodes` are saved inner nodes
  (their position is their index); `links` are `[from index, from slot, to index, to slot,
  original id, type]`, a `null` origin meaning "fed from outside the group".
- An instance is a node typed `workflow/<name>` (older editors) or `workflow><name>`.
- The instance's sockets and widgets are derived, in inner-node order, from each inner node's
  schema: every widget of an inner node is a widget of the instance (a `seed`/`noise_seed` one,
  or one declared with a control, followed by its control value), every input socket not fed
  by an inner link is an input of the instance, and every output not linked inside the group
  (unless listed in `external`) is an output of the instance. Widgets converted to sockets on
  an inner node come after all of those, as widgets and as inputs. `config[<index>]` renames an
  input or output, or hides it with `visible: false`.
- A Reroute used only inside the group contributes nothing; one at the group's edge is an
  input (or output) typed by what it carries. Types with no schema (notes) contribute nothing.
- The API prompt names inner nodes "<instance id>:<inner index>".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.node import WIDGET_TYPES
from engine.workflow_subgraph import (
    PRIMITIVE_TYPE,
    REROUTE_TYPE,
    WidgetSpec,
    WorkflowFormatError,
    assign_widget_values,
    schema_inputs,
)

GROUP_PREFIXES = ("workflow/", "workflow>")
SEED_NAMES = frozenset({"seed", "noise_seed"})
CONTROL_PLACEHOLDER = "fixed"  # the control value after a seed; the API prompt never carries it


@dataclass
class GroupLayout:
    """How an instance's widgets, inputs and outputs map onto a definition's inner nodes."""

    widgets: list[tuple[int, WidgetSpec]] = field(default_factory=list)  # (inner index, widget)
    inputs: list[tuple[int, int]] = field(default_factory=list)  # (inner index, input slot)
    outputs: list[tuple[int, int]] = field(default_factory=list)  # (inner index, output slot)
    inner_links: list[tuple[int, int, int, int]] = field(default_factory=list)
    node_widgets: dict[int, list[WidgetSpec]] = field(default_factory=dict)  # schema order


def group_name(node_type: str, groups: Mapping[str, Any]) -> str | None:
    """The definition name an instance type refers to, if it is a known group node."""
    for prefix in GROUP_PREFIXES:
        if node_type.startswith(prefix) and node_type[len(prefix):] in groups:
            return node_type[len(prefix):]
    return None


def expand_group_nodes(workflow: Mapping[str, Any],
                       schemas: Mapping[str, dict]) -> Mapping[str, Any]:
    """The workflow with every group node instance replaced by its inner nodes and links (a
    workflow that is not an object is returned as is, for the flattener to reject)."""
    if not isinstance(workflow, Mapping):
        return workflow
    extra = workflow.get("extra")
    groups = extra.get("groupNodes") if isinstance(extra, Mapping) else None
    nodes = workflow.get("nodes")
    if not isinstance(groups, Mapping) or not groups or not isinstance(nodes, list):
        return workflow
    instances = {str(node.get("id")): group_name(str(node.get("type")), groups) for node in nodes
                 if isinstance(node, Mapping) and isinstance(node.get("type"), str)}
    instances = {node_id: name for node_id, name in instances.items() if name is not None}
    if not instances:
        return workflow
    layouts = {name: layout_group(name, groups[name], schemas) for name in set(instances.values())}
    expanded = _Expansion(workflow, instances, {name: groups[name] for name in layouts}, layouts)
    return expanded.result()


def _inner_nodes(name: str, definition: Any) -> list[Mapping[str, Any]]:
    nodes = definition.get("nodes") if isinstance(definition, Mapping) else None
    if not isinstance(nodes, list) or not all(isinstance(node, Mapping) for node in nodes):
        raise WorkflowFormatError(
            f"group node {name!r}: extra.groupNodes[{name!r}].nodes must be a list of node "
            "objects; re-save the workflow from an editor that still has the group node")
    return nodes


def _definition_links(name: str, definition: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    links = definition.get("links") or []
    if not isinstance(links, list):
        raise WorkflowFormatError(f"group node {name!r}: 'links' must be a list, got {links!r}")
    parsed = []
    for link in links:
        if not isinstance(link, (list, tuple)) or len(link) < 4:
            raise WorkflowFormatError(
                f"group node {name!r}: link {link!r} must be [from index, from slot, to index, "
                "to slot, ...]")
        parsed.append(tuple(link))
    return parsed


def layout_group(name: str, definition: Any, schemas: Mapping[str, dict]) -> GroupLayout:
    """Derive an instance's widgets, inputs and outputs the way the editor builds its type."""
    nodes = _inner_nodes(name, definition)
    links = _definition_links(name, definition)
    links_to = {(link[2], link[3]): (link[0], link[1]) for link in links if link[0] is not None}
    links_from = {(link[0], link[1]) for link in links if link[0] is not None}
    external = {(ext[0], ext[1]) for ext in definition.get("external") or []
                if isinstance(ext, (list, tuple)) and len(ext) >= 2 and isinstance(ext[0], int)}
    config = definition.get("config") or {}
    layout = GroupLayout(inner_links=[(*source, *target) for target, source in links_to.items()])
    converted: list[tuple[int, WidgetSpec, int]] = []
    for index, node in enumerate(nodes):
        node_config = config.get(str(index)) or {} if isinstance(config, Mapping) else {}
        sockets = _node_sockets(node, index, links_to, links_from, external, schemas)
        if sockets is None:
            continue
        widgets, slots, node_converted, outputs = sockets
        layout.node_widgets[index] = _all_widgets(node, schemas)
        layout.widgets.extend((index, spec) for spec in widgets)
        converted.extend((index, spec, len(slots) + position)
                         for position, spec in enumerate(node_converted))
        for slot, input_name in enumerate(slots):
            hidden = _config_of(node_config, "input", input_name).get("visible") is False
            if (index, slot) not in links_to and not hidden:
                layout.inputs.append((index, slot))
        for slot in range(outputs):
            linked = (index, slot) in links_from and (index, slot) not in external
            if _config_of(node_config, "output", slot).get("visible", not linked):
                layout.outputs.append((index, slot))
    for index, spec, slot in converted:
        if (index, slot) not in links_to:
            layout.widgets.append((index, spec))
            layout.inputs.append((index, slot))
    return layout


def _config_of(node_config: Any, side: str, key: Any) -> Mapping[str, Any]:
    entries = node_config.get(side) if isinstance(node_config, Mapping) else None
    entry = entries.get(str(key)) if isinstance(entries, Mapping) else None
    return entry if isinstance(entry, Mapping) else {}


def _node_sockets(node: Mapping[str, Any], index: int, links_to: Mapping, links_from: set,
                  external: set, schemas: Mapping[str, dict],
                  ) -> tuple[list[WidgetSpec], list[str], list[WidgetSpec], int] | None:
    """(widgets, input socket names, widgets converted to sockets, output count), or None when
    the inner node contributes nothing (a note, an inner-only reroute, an unlinked primitive)."""
    node_type = node.get("type")
    if node_type == REROUTE_TYPE:
        inner_only = (index, 0) in links_to and (index, 0) in links_from \
            and (index, 0) not in external
        return None if inner_only else ([], [""], [], 1)
    if node_type == PRIMITIVE_TYPE:
        if (index, 0) not in links_from:
            return None
        return [WidgetSpec("value", "*", has_control=True)], [], [], 1
    schema = schemas.get(node_type) if isinstance(node_type, str) else None
    if schema is None:
        return None
    widgets, slots, converted = [], [], []
    socket_widgets = {slot.get("name") for slot in node.get("inputs") or []
                      if isinstance(slot, Mapping) and isinstance(slot.get("widget"), Mapping)}
    for input_name, declared in schema_inputs(schema):
        spec = _widget(input_name, declared)
        if spec is None:
            slots.append(input_name)
        elif input_name in socket_widgets:
            converted.append(spec)
        else:
            widgets.append(spec)
    return widgets, slots, converted, len(schema.get("output") or [])


def _all_widgets(node: Mapping[str, Any], schemas: Mapping[str, dict]) -> list[WidgetSpec]:
    """An inner node's widgets in schema order (its own `widgets_values` follow this order)."""
    if node.get("type") == PRIMITIVE_TYPE:
        return [WidgetSpec("value", "*", has_control=True)]
    schema = schemas.get(node.get("type")) if isinstance(node.get("type"), str) else None
    found = (_widget(name, declared) for name, declared in schema_inputs(schema or {}))
    return [spec for spec in found if spec is not None]


def _widget(name: str, declared: Any) -> WidgetSpec | None:
    """The widget an input is in the editor (by its type alone, as the group builder decides)."""
    if not isinstance(declared, (list, tuple)) or not declared:
        return None
    kind = declared[0]
    value_type = "COMBO" if isinstance(kind, list) else str(kind)
    if value_type not in WIDGET_TYPES:
        return None
    options = declared[1] if len(declared) > 1 and isinstance(declared[1], Mapping) else {}
    control = name in SEED_NAMES or bool(options.get("control_after_generate"))
    return WidgetSpec(name, value_type, control)


class _Expansion:
    """One pass over the top-level graph replacing instances by "<instance id>:<index>" nodes."""

    def __init__(self, workflow: Mapping[str, Any], instances: Mapping[str, str],
                 definitions: Mapping[str, Any], layouts: Mapping[str, GroupLayout]) -> None:
        self.workflow = workflow
        self.instances = instances
        self.definitions = definitions
        self.layouts = layouts
        self.new_nodes: dict[str, dict[str, Any]] = {}
        self.links: list[list[Any]] = []

    def result(self) -> dict[str, Any]:
        nodes = []
        for node in self.workflow["nodes"]:
            node_id = str(node.get("id")) if isinstance(node, Mapping) else ""
            if node_id in self.instances:
                nodes.extend(self._inner(node, self.instances[node_id]))
            else:
                nodes.append(node)
        for link in self.workflow.get("links") or []:
            self.links.append(self._rewire(link))
        return {**self.workflow, "nodes": nodes, "links": self.links}

    def _inner(self, instance: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
        layout = self.layouts[name]
        prefix = f"{instance['id']}:"
        inner = [self._copy(node, prefix + str(index), instance)
                 for index, node in enumerate(self.definitions[name]["nodes"])]
        for number, (src, src_slot, dst, dst_slot) in enumerate(layout.inner_links):
            link_id = f"{prefix}link{number}"
            _set_link(inner[dst], dst_slot, link_id)
            self.links.append([link_id, inner[src]["id"], src_slot, inner[dst]["id"], dst_slot])
        self._apply_widgets(instance, layout, inner)
        for node in inner:
            self.new_nodes[node["id"]] = node
        return inner

    @staticmethod
    def _copy(node: Mapping[str, Any], node_id: str, instance: Mapping[str, Any]) -> dict:
        copy = {**node, "id": node_id,
                "inputs": [dict(slot, link=None) if isinstance(slot, Mapping) else {}
                           for slot in node.get("inputs") or []]}
        if instance.get("mode"):
            copy["mode"] = instance["mode"]
        return copy

    def _apply_widgets(self, instance: Mapping[str, Any], layout: GroupLayout,
                       inner: list[dict[str, Any]]) -> None:
        """Distribute the instance's widget values over the inner nodes' exposed widgets."""
        saved = instance.get("widgets_values")
        saved = saved if isinstance(saved, list) else []
        specs = [WidgetSpec(f"{index}:{spec.name}", spec.value_type, spec.has_control)
                 for index, spec in layout.widgets]
        assigned = assign_widget_values(saved, specs)
        for index, node_specs in layout.node_widgets.items():
            own = inner[index].get("widgets_values")
            values = assign_widget_values(own if isinstance(own, list) else [], node_specs)
            values.update({spec.name: assigned[f"{index}:{spec.name}"] for spec in node_specs
                           if f"{index}:{spec.name}" in assigned})
            inner[index]["widgets_values"] = _positional(values, node_specs)

    def _rewire(self, link: Any) -> Any:
        """An outer link, its ends moved from an instance's sockets onto inner nodes."""
        if not isinstance(link, (list, tuple)) or len(link) < 5:
            return link
        link = list(link)
        origin, target = str(link[1]), str(link[3])
        if origin in self.instances and isinstance(link[2], int):
            link[1:3] = self._inner_end(origin, self.layouts[self.instances[origin]].outputs,
                                        link[2], "output")
        if target in self.instances and isinstance(link[4], int):
            link[3:5] = self._inner_end(target, self.layouts[self.instances[target]].inputs,
                                        link[4], "input")
            _set_link(self.new_nodes[link[3]], link[4], link[0])
        return link

    def _inner_end(self, instance_id: str, ends: list[tuple[int, int]], slot: int,
                   side: str) -> list[Any]:
        if not 0 <= slot < len(ends):
            raise WorkflowFormatError(
                f"node {instance_id} (group node {self.instances[instance_id]!r}) has no {side} "
                f"{slot}: its definition exposes {len(ends)} {side}s; reconnect the link in the "
                "editor")
        index, inner_slot = ends[slot]
        return [f"{instance_id}:{index}", inner_slot]


def _set_link(node: dict[str, Any], slot: int, link_id: Any) -> None:
    inputs = node["inputs"]
    while len(inputs) <= slot:
        inputs.append({})
    inputs[slot] = {**inputs[slot], "link": link_id}


def _positional(values: Mapping[str, Any], specs: list[WidgetSpec]) -> list[Any]:
    """Widget values in editor order, a control value after each seed; stops at a missing one."""
    laid_out: list[Any] = []
    for spec in specs:
        if spec.name not in values:
            break
        laid_out.append(values[spec.name])
        if spec.has_control:
            laid_out.append(CONTROL_PLACEHOLDER)
    return laid_out
