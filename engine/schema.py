"""The ComfyUI `GET /object_info` entry of a node, generated from its declaration."""

from __future__ import annotations

from typing import Any

from engine.node import MISSING, Input, NodeSchema


def input_options(spec: Input, env: Any = None) -> dict[str, Any]:
    """The options dict ComfyUI puts second in an input's spec."""
    opts: dict[str, Any] = {}
    if spec.default is not MISSING:
        opts["default"] = spec.default
    for key in ("min", "max", "step", "round"):
        value = getattr(spec, key)
        if value is not None:
            opts[key] = value
    if spec.tooltip:
        opts["tooltip"] = spec.tooltip
    if spec.lazy:
        opts["lazy"] = True
    opts.update(spec.options)
    if spec.type == "COMBO" and spec.combo_style == "v3":
        opts.setdefault("multiselect", False)
        opts["options"] = spec.resolved_choices(env) or []
    return opts


def input_spec(spec: Input, env: Any = None) -> list[Any] | str:
    """One input as ComfyUI serialises it: [type, options], [[choices], options] or a kind."""
    if spec.hidden:
        return spec.type
    opts = input_options(spec, env)
    if spec.type == "COMBO" and spec.combo_style != "v3":
        return [spec.resolved_choices(env) or [], opts]
    return [spec.type, opts]


def object_info_entry(schema: NodeSchema, env: Any = None) -> dict[str, Any]:
    """The full `/object_info/{class}` value for one node type."""
    # ComfyUI always lists a "required" section, empty when every input is optional
    sections: dict[str, dict[str, Any]] = {"required": {}}
    order: dict[str, list[str]] = {"required": []}
    for spec in schema.inputs:
        section = "hidden" if spec.hidden else "optional" if spec.optional else "required"
        sections.setdefault(section, {})[spec.name] = input_spec(spec, env)
        order.setdefault(section, []).append(spec.name)
    kinds = ("required", "optional", "hidden")
    entry: dict[str, Any] = {
        "input": {key: sections[key] for key in kinds if key in sections},
        "input_order": {key: order[key] for key in kinds if key in order},
        "output": [out.type for out in schema.outputs],
        "output_is_list": [out.is_list for out in schema.outputs],
        "output_name": [out.display_name for out in schema.outputs],
        "name": schema.name,
        "display_name": schema.display_name or schema.name,
        "description": schema.description,
        "python_module": schema.python_module,
        "category": schema.category,
        "output_node": schema.output_node,
    }
    tooltips = [out.tooltip or "" for out in schema.outputs]
    if any(tooltips):
        entry["output_tooltips"] = tooltips
    if schema.deprecated:
        entry["deprecated"] = True
    if schema.experimental:
        entry["experimental"] = True
    return entry
