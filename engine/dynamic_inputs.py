"""ComfyUI V3's dynamic inputs: one declared input that stands for a set of concrete inputs,
named "<parent>.<member>" in prompts and editor files, which the node receives as one dict.

- Autogrow: a template input repeated as <prefix>0, <prefix>1, ... (up to `max`), or under a
  list of names; the first `min` are required. The node gets {"image0": value, "image1": value,
  ...} in index (or name) order.
- DynamicCombo: a drop-down whose chosen option brings its own inputs. The prompt carries the
  choice under the parent's name and each option input as "<parent>.<name>"; the node gets
  {"<parent>": choice, "<name>": value, ...}.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from engine.context import NodeContext
from engine.node import Input, Node, NodeResult, NodeSchema

AUTOGROW = "COMFY_AUTOGROW_V3"
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
MATCH_TYPE = "COMFY_MATCHTYPE_V3"


@dataclass(frozen=True)
class AutogrowInputs:
    """A template input repeated as <prefix>0 .. <prefix>{max-1}; the first `min` required."""

    template: Input
    prefix: str
    min: int = 1
    max: int = 10

    def members(self, parent: Input) -> tuple[Input, ...]:
        return tuple(replace(self.template, name=f"{parent.name}.{self.prefix}{index}",
                             optional=index >= self.min) for index in range(self.max))

    def present_members(self, parent: Input, literals: Mapping[str, Any]) -> tuple[Input, ...]:
        return self.members(parent)

    def group(self, parent: str, flat: Mapping[str, Any]) -> dict[str, Any]:
        """{"<prefix><i>": value} for the members present, in index order."""
        pattern = re.compile(rf"{re.escape(parent)}\.({re.escape(self.prefix)}(\d+))")
        found = [(int(match[2]), match[1], value) for key, value in flat.items()
                 if (match := pattern.fullmatch(key))]
        return {name: value for _, name, value in sorted(found, key=lambda item: item[0])}


@dataclass(frozen=True)
class AutogrowNamedInputs:
    """A template input repeated under the given names; the first `min` required."""

    template: Input
    names: tuple[str, ...]
    min: int = 1

    def members(self, parent: Input) -> tuple[Input, ...]:
        return tuple(replace(self.template, name=f"{parent.name}.{name}",
                             optional=index >= self.min) for index, name in enumerate(self.names))

    def present_members(self, parent: Input, literals: Mapping[str, Any]) -> tuple[Input, ...]:
        return self.members(parent)

    def group(self, parent: str, flat: Mapping[str, Any]) -> dict[str, Any]:
        """{name: value} for the members present, in declaration order."""
        return {name: flat[f"{parent}.{name}"] for name in self.names if f"{parent}.{name}" in flat}


@dataclass(frozen=True)
class ComboOption:
    """One choice of a DynamicCombo and the inputs it brings."""

    key: str
    inputs: tuple[Input, ...] = ()


@dataclass(frozen=True)
class DynamicComboInputs:
    """A drop-down of option keys; the chosen option's inputs join the node's inputs."""

    options: tuple[ComboOption, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(option.key for option in self.options)

    def selector(self, parent: Input) -> Input:
        """The drop-down itself, as the plain COMBO it is validated as."""
        return Input(parent.name, "COMBO", choices=self.keys, optional=parent.optional)

    def members(self, parent: Input) -> tuple[Input, ...]:
        """Every option's inputs under "<parent>.<name>" (options may share a name)."""
        seen: dict[str, Input] = {}
        for option in self.options:
            for spec in option.inputs:
                seen.setdefault(spec.name, replace(spec, name=f"{parent.name}.{spec.name}"))
        return tuple(seen.values())

    def present_members(self, parent: Input, literals: Mapping[str, Any]) -> tuple[Input, ...]:
        """The drop-down, then the inputs of the option the prompt chose (none if unknown)."""
        chosen = literals.get(parent.name)
        inputs = next((option.inputs for option in self.options if option.key == chosen), ())
        return (self.selector(parent),) + tuple(
            replace(spec, name=f"{parent.name}.{spec.name}") for spec in inputs)

    def group(self, parent: str, flat: Mapping[str, Any]) -> dict[str, Any]:
        grouped = {parent: flat.get(parent)}
        grouped.update({key[len(parent) + 1:]: value for key, value in flat.items()
                        if key.startswith(parent + ".")})
        return grouped


def Autogrow(name: str, template: Input, prefix: str, min: int = 1, max: int = 10,
             **kw: Any) -> Input:
    """An input that grows a new `template` socket each time the last one is connected."""
    if not 0 <= min <= max:
        raise ValueError(f"Autogrow {name!r}: need 0 <= min <= max, got min={min}, max={max}")
    return Input(name, AUTOGROW, dynamic=AutogrowInputs(template, prefix, min, max), **kw)


def AutogrowNames(name: str, template: Input, names: tuple[str, ...], min: int = 1,
                  **kw: Any) -> Input:
    """An input that grows `template` sockets named `names`, one at a time."""
    if not 0 <= min <= len(names):
        raise ValueError(f"Autogrow {name!r}: need 0 <= min <= {len(names)} names, got {min}")
    return Input(name, AUTOGROW, dynamic=AutogrowNamedInputs(template, tuple(names), min), **kw)


def DynamicCombo(name: str, options: tuple[ComboOption, ...], **kw: Any) -> Input:
    """A drop-down whose chosen option adds that option's inputs."""
    return Input(name, DYNAMIC_COMBO, dynamic=DynamicComboInputs(tuple(options)), **kw)


def MatchType(name: str, template_id: str, allowed_types: str = "*", **kw: Any) -> Input:
    """An input of any allowed type; the editor gives every input and output sharing
    `template_id` the type of the first connected one (checked by the editor, as in ComfyUI)."""
    options = {"template": {"allowed_types": allowed_types, "template_id": template_id},
               **kw.pop("options", {})}
    return Input(name, MATCH_TYPE, options=options, **kw)


def group_dynamic_inputs(schema: NodeSchema, flat: Mapping[str, Any]) -> dict[str, Any]:
    """The node's keyword arguments with each dynamic input's members gathered into one dict."""
    grouped = {key: value for key, value in flat.items() if not _is_member(schema, key)}
    for spec in schema.inputs:
        if spec.dynamic is not None:
            grouped[spec.name] = spec.dynamic.group(spec.name, flat)
    return grouped


def _is_member(schema: NodeSchema, key: str) -> bool:
    parent = key.split(".", 1)[0]
    spec = schema.input(parent)
    return spec is not None and spec.dynamic is not None


class GroupedInputsNode(Node):
    """Base of nodes with dynamic inputs: `run` receives each of them as one dict."""

    def execute(self, ctx: NodeContext, **inputs: Any) -> NodeResult | tuple[Any, ...]:
        return self.run(ctx, **group_dynamic_inputs(self.schema, inputs))

    def run(self, ctx: NodeContext, **inputs: Any) -> NodeResult | tuple[Any, ...]:
        raise NotImplementedError
