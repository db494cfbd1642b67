"""Workflows in both ComfyUI formats: editor ("UI") to API conversion, and reading files and PNGs.

The API format is what runs: `{"<id>": {"class_type", "inputs", "_meta"}}` with links as
`["<source id>", output index]`. The editor format is what people save and what PNGs carry; it is
converted the way the official editor's "Save (API)" does, using each class's `/object_info`
entry to name its positional widget values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from engine.dynamic_inputs import DYNAMIC_COMBO
from engine.node import WIDGET_TYPES
from engine.workflow_groupnode import expand_group_nodes
from engine.workflow_subgraph import (
    FlatGraph,
    FlatNode,
    Slot,
    WidgetSpec,
    WorkflowFormatError,
    assign_widget_values,
    flatten_workflow,
    resolve_source,
    schema_inputs,
)

__all__ = [
    "WorkflowFormatError",
    "is_api_format",
    "is_ui_format",
    "read_workflow_file",
    "to_api_prompt",
    "ui_to_api",
    "widget_specs",
]

_API_EXAMPLE = '{"3": {"class_type": "KSampler", "inputs": {...}}}'
_METADATA_KEYS = ("prompt", "workflow")


def widget_specs(schema: Mapping[str, Any]) -> list[WidgetSpec]:
    """The widgets of a class in editor order: required then optional inputs of a widget type."""
    found = (_widget_spec(name, declared) for name, declared in schema_inputs(schema))
    return [spec for spec in found if spec is not None]


def _widget_spec(name: str, declared: Any) -> WidgetSpec | None:
    if not isinstance(declared, (list, tuple)) or not declared:
        return None
    kind = declared[0]
    options = declared[1] if len(declared) > 1 and isinstance(declared[1], Mapping) else {}
    if kind == DYNAMIC_COMBO:
        return WidgetSpec(name, "COMBO", branches=_combo_branches(name, options))
    value_type = "COMBO" if isinstance(kind, list) else kind
    if value_type not in WIDGET_TYPES or options.get("forceInput"):
        return None
    return WidgetSpec(name, value_type, bool(options.get("control_after_generate")))


def _combo_branches(name: str, options: Mapping[str, Any]) -> dict[str, tuple[WidgetSpec, ...]]:
    """A DynamicCombo's widgets per choice, named "<combo>.<input>" as the editor names them."""
    branches = {}
    for option in options.get("options") or ():
        if isinstance(option, Mapping) and isinstance(option.get("key"), str):
            inner = widget_specs({"input": option.get("inputs") or {}})
            branches[option["key"]] = tuple(replace(spec, name=f"{name}.{spec.name}")
                                            for spec in inner)
    return branches


def _all_specs(specs: list[WidgetSpec]) -> list[WidgetSpec]:
    """The widgets with every DynamicCombo choice's widgets after them (for named values)."""
    flat = []
    for spec in specs:
        flat.append(spec)
        for branch in (spec.branches or {}).values():
            flat.extend(_all_specs(list(branch)))
    return flat


def ui_to_api(workflow: dict, schemas: Mapping[str, dict]) -> dict:
    """Convert an editor workflow to the API prompt the editor would queue for it."""
    graph = flatten_workflow(expand_group_nodes(workflow, schemas))
    emitted = sorted((node for node in graph.nodes.values() if node.is_emitted()),
                     key=lambda node: _id_sort_key(node.node_id))
    return {node.node_id: _api_node(graph, node, schemas.get(node.type)) for node in emitted}


def _id_sort_key(node_id: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in node_id.split(":"))


def _api_node(graph: FlatGraph, node: FlatNode, schema: Mapping[str, Any] | None) -> dict:
    """One API node: widget values first, then linked inputs (which win over a widget value)."""
    inputs = _widget_inputs(node, schema)
    for index, slot in enumerate(node.inputs):
        name = slot.get("name")
        source = resolve_source(graph, Slot(node.node_id, index))
        if not isinstance(name, str) or source is None:
            continue
        inputs[name] = [source.node_id, source.index] if isinstance(source, Slot) else source.value
    return {"inputs": inputs, "class_type": node.type, "_meta": _meta(node, schema)}


def _widget_inputs(node: FlatNode, schema: Mapping[str, Any] | None) -> dict[str, Any]:
    """Widget values by name: positional via the schema, else from a name -> value dict."""
    saved = node.raw.get("widgets_values")
    named = saved if isinstance(saved, Mapping) else node.raw.get("widgets_values_named")
    named = named if isinstance(named, Mapping) else {}  # editor 1.5x saves both forms
    if schema is None:
        values = {name: value for name, value in named.items()
                  if name != "control_after_generate"}
    elif isinstance(saved, list):
        values = assign_widget_values(saved, widget_specs(schema))
    else:
        values = {spec.name: named[spec.name] for spec in _all_specs(widget_specs(schema))
                  if spec.name in named}
    values.update(node.widget_overrides)
    return values


def _meta(node: FlatNode, schema: Mapping[str, Any] | None) -> dict[str, Any]:
    """`_meta` as the editor writes it: the title, plus the node pack id and version it records."""
    title = node.raw.get("title") or (schema or {}).get("display_name") or node.type
    meta: dict[str, Any] = {"title": title}
    properties = node.raw.get("properties")
    for key in ("cnr_id", "ver"):
        if isinstance(properties, Mapping) and isinstance(properties.get(key), str):
            meta[key] = properties[key]
    return meta


def is_api_format(data: Any) -> bool:
    """Whether `data` is an API prompt: a non-empty map of node id -> {"class_type", ...}."""
    return (isinstance(data, Mapping) and bool(data)
            and all(isinstance(body, Mapping) and isinstance(body.get("class_type"), str)
                    for body in data.values()))


def is_ui_format(data: Any) -> bool:
    """Whether `data` is an editor workflow: an object with a `nodes` list."""
    return isinstance(data, Mapping) and isinstance(data.get("nodes"), list)


def to_api_prompt(data: dict, schemas: Mapping[str, dict]) -> dict:
    """Either format in, an API prompt out (node ids as strings)."""
    if is_api_format(data):
        return {str(node_id): body for node_id, body in data.items()}
    if is_ui_format(data):
        return ui_to_api(data, schemas)
    raise WorkflowFormatError(_neither_format(data))


def _neither_format(data: Any) -> str:
    """Why `data` is in neither format, and what each one looks like."""
    expected = (f"expected an API prompt like {_API_EXAMPLE} or an editor workflow with "
                "'nodes' and 'links' lists")
    if not isinstance(data, Mapping):
        return f"{expected}; got {type(data).__name__}"
    if not data:
        return f"{expected}; got an empty object"
    for node_id, body in data.items():
        if not isinstance(body, Mapping) or not isinstance(body.get("class_type"), str):
            return (f"{expected}; got an object whose entry {node_id!r} is not a node with a "
                    f"'class_type' (keys: {sorted(map(str, data))[:8]})")
    return expected


def read_workflow_file(path: Path) -> tuple[dict | None, dict | None]:
    """(api prompt, editor workflow) from a .json file or an image's metadata; absent ones None."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        data = _parse_json(path.read_text(encoding="utf-8"), f"{path}")
        if is_api_format(data):
            return data, None
        if is_ui_format(data):
            return None, data
        raise WorkflowFormatError(f"{path}: {_neither_format(data)}")
    return _read_image_workflow(path)


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise WorkflowFormatError(
            f"{where} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from err


def _read_image_workflow(path: Path) -> tuple[dict | None, dict | None]:
    """The `prompt` and `workflow` an image carries (PNG text chunks, or WebP/JPEG EXIF)."""
    try:
        with Image.open(path) as image:
            texts = _image_texts(image)
    except UnidentifiedImageError as err:
        raise WorkflowFormatError(
            f"{path}: not a .json workflow and not an image Pillow can read; pass a workflow "
            ".json or a PNG saved with its workflow") from err
    found = {key: _parse_json(texts[key], f"{path}: the {key!r} metadata")
             for key in _METADATA_KEYS if key in texts}
    prompt, workflow = found.get("prompt"), found.get("workflow")
    if prompt is None and workflow is None:
        raise WorkflowFormatError(
            f"{path}: the image carries no 'prompt' or 'workflow' metadata; it was saved "
            "without a workflow (or its metadata was stripped); use the workflow .json instead")
    if prompt is not None and not is_api_format(prompt):
        raise WorkflowFormatError(f"{path}: the 'prompt' metadata is not an API prompt; "
                                  f"{_neither_format(prompt)}")
    if workflow is not None and not is_ui_format(workflow):
        raise WorkflowFormatError(f"{path}: the 'workflow' metadata is not an editor workflow "
                                  "(an object with a 'nodes' list)")
    return prompt, workflow


def _image_texts(image: Image.Image) -> dict[str, str]:
    """PNG tEXt/iTXt/zTXt chunks, then EXIF strings of the form "prompt:{...}" (ComfyUI WebP)."""
    texts: dict[str, str] = {}
    chunks = getattr(image, "text", None) or image.info
    for key in _METADATA_KEYS:
        value = chunks.get(key)
        if isinstance(value, (str, bytes)):
            texts[key] = _as_text(value)
    for value in image.getexif().values():
        text = _as_text(value) if isinstance(value, (str, bytes)) else ""
        key, _, body = text.partition(":")
        if key in _METADATA_KEYS and key not in texts:
            texts[key] = body
    return texts


def _as_text(value: str | bytes) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
