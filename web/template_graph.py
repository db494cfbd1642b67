"""Building editor-format ("UI") workflows from node schemas, for the templates Loom ships, and
drawing a small preview of one (the thumbnail the editor's template browser shows).

A node's sockets come from its /object_info entry (inputs that are not widgets, in input order;
outputs by name), so a template states only its nodes, widget values and connections."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw

from engine.workflow import widget_specs

COLUMN_WIDTH, ROW_HEIGHT = 360, 220  # grid cell of a node's position, in canvas units
NODE_WIDTH = 320
WORKFLOW_VERSION = 0.4


class TemplateError(ValueError):
    """A template that names an unknown node type, input or output."""


@dataclass(frozen=True)
class Socket:
    """One node output: the node's id and the output index."""

    node_id: int
    slot: int
    type: str


@dataclass
class TemplateNode:
    """A node being built; `out(name)` is one of its outputs to connect elsewhere."""

    node_id: int
    kind: str
    schema: Mapping[str, Any]
    raw: dict[str, Any] = field(default_factory=dict)

    def out(self, name: str | None = None) -> Socket:
        names = list(self.schema.get("output_name") or [])
        slot = 0 if name is None else names.index(name) if name in names else -1
        if slot < 0 or slot >= len(names):
            raise TemplateError(f"{self.kind} has no output {name!r}; it has {names}")
        return Socket(self.node_id, slot, self.schema["output"][slot])


def socket_inputs(schema: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(name, type) of every input that is a socket rather than a widget, in editor order."""
    widgets = {spec.name for spec in widget_specs(schema)}
    sockets = []
    for section in ("required", "optional"):
        declared = (schema.get("input") or {}).get(section) or {}
        for name in (schema.get("input_order") or {}).get(section) or list(declared):
            kind = declared[name][0]
            if name not in widgets:
                sockets.append((name, kind if isinstance(kind, str) else "COMBO"))
    return sockets


class GraphBuilder:
    """Adds nodes on a grid and links them; `workflow()` is the editor-format result."""

    def __init__(self, schemas: Mapping[str, Mapping[str, Any]]) -> None:
        self.schemas = schemas
        self.nodes: list[TemplateNode] = []
        self.links: list[list[Any]] = []

    def node(self, kind: str, widgets: list[Any], at: tuple[float, float],
             title: str | None = None, height: int = 0, **links: Socket) -> TemplateNode:
        """A node of `kind` at grid cell `at` (column, row) with positional widget values,
        its sockets fed by `links` (input name -> an output of an earlier node)."""
        schema = self.schemas.get(kind)
        if schema is None:
            raise TemplateError(f"unknown node type {kind!r}")
        node = TemplateNode(len(self.nodes) + 1, kind, schema)
        rows = len(widget_specs(schema)) + max(len(schema["output"]), len(socket_inputs(schema)))
        node.raw = {
            "id": node.node_id, "type": kind, "pos": [at[0] * COLUMN_WIDTH, at[1] * ROW_HEIGHT],
            "size": [NODE_WIDTH, height or 46 + 24 * rows], "flags": {}, "order": len(self.nodes),
            "mode": 0, "inputs": self._inputs(node, links),
            "outputs": [{"name": name, "type": kind_, "links": [], "slot_index": slot}
                        for slot, (name, kind_) in enumerate(zip(
                            schema["output_name"], schema["output"], strict=True))],
            "properties": {"Node name for S&R": kind}, "widgets_values": list(widgets)}
        if title:
            node.raw["title"] = title
        self.nodes.append(node)
        return node

    def _inputs(self, node: TemplateNode, links: Mapping[str, Socket]) -> list[dict[str, Any]]:
        sockets = socket_inputs(node.schema)
        unknown = set(links) - {name for name, _ in sockets}
        if unknown:
            raise TemplateError(f"{node.kind} has no socket {sorted(unknown)}; its sockets are "
                                f"{[name for name, _ in sockets]}")
        inputs = []
        for index, (name, kind) in enumerate(sockets):
            source = links.get(name)
            link_id = None
            if source is not None:
                link_id = len(self.links) + 1
                self.links.append([link_id, source.node_id, source.slot, node.node_id, index,
                                   source.type])
                self.nodes[source.node_id - 1].raw["outputs"][source.slot]["links"].append(
                    link_id)
            inputs.append({"name": name, "type": kind, "link": link_id})
        return inputs

    def workflow(self) -> dict[str, Any]:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links),
                "nodes": [node.raw for node in self.nodes], "links": self.links,
                "groups": [], "config": {}, "extra": {"ds": {"scale": 1, "offset": [0, 0]}},
                "version": WORKFLOW_VERSION}


THUMBNAIL_SIZE, THUMBNAIL_MARGIN = 256, 12
THUMBNAIL_BACKGROUND, NODE_FILL, NODE_EDGE, LINK_COLOUR = "#202124", "#353a40", "#8ab4f8", "#9aa0a6"


def thumbnail_png(workflow: Mapping[str, Any]) -> bytes:
    """A square PNG sketch of the workflow: its nodes as boxes, its links as lines."""
    nodes = {node["id"]: node for node in workflow["nodes"]}
    left = min(node["pos"][0] for node in nodes.values())
    top = min(node["pos"][1] for node in nodes.values())
    right = max(node["pos"][0] + node["size"][0] for node in nodes.values())
    bottom = max(node["pos"][1] + node["size"][1] for node in nodes.values())
    scale = (THUMBNAIL_SIZE - 2 * THUMBNAIL_MARGIN) / max(right - left, bottom - top)
    start_x = (THUMBNAIL_SIZE - (right - left) * scale) / 2  # the sketch centred
    start_y = (THUMBNAIL_SIZE - (bottom - top) * scale) / 2

    def point(x: float, y: float) -> tuple[float, float]:
        return start_x + (x - left) * scale, start_y + (y - top) * scale

    picture = Image.new("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE), THUMBNAIL_BACKGROUND)
    draw = ImageDraw.Draw(picture)
    for _, source, _, target, _, _ in workflow["links"]:
        start, end = nodes[source], nodes[target]
        draw.line([point(start["pos"][0] + start["size"][0], start["pos"][1] + 20),
                   point(end["pos"][0], end["pos"][1] + 20)], fill=LINK_COLOUR, width=2)
    for node in nodes.values():
        x, y = node["pos"]
        draw.rounded_rectangle([point(x, y), point(x + node["size"][0], y + node["size"][1])],
                               radius=4, fill=NODE_FILL, outline=NODE_EDGE)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
