"""Adapts ComfyUI "classic protocol" node classes (INPUT_TYPES, RETURN_TYPES, FUNCTION, ...) to
Loom's Node API, so custom-node packs written for ComfyUI run unmodified."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from engine.comfy_host import from_pack, running, to_pack
from engine.context import NodeContext
from engine.graph import is_link
from engine.node import (
    ALWAYS_CHANGED,
    HIDDEN_KINDS,
    ExpansionLink,
    Input,
    Node,
    NodeResult,
    NodeSchema,
    Output,
)

logger = logging.getLogger("loom.custom_nodes")

DEFAULT_CATEGORY = "sd"  # the category ComfyUI gives a class that declares none
_NUMERIC_KEYS = ("min", "max", "step", "round")


class ClassicNodeError(ValueError):
    """A classic node class whose declaration cannot be adapted (bad INPUT_TYPES, FUNCTION...)."""


@dataclass(frozen=True)
class HookSignature:
    """The keyword parameters a classic hook (IS_CHANGED, VALIDATE_INPUTS...) accepts."""

    names: frozenset[str]
    required: frozenset[str]
    takes_kwargs: bool

    def select(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The values the hook names (all with **kwargs); named ones with no value get None."""
        chosen = dict(values) if self.takes_kwargs else {
            name: value for name, value in values.items() if name in self.names}
        chosen.update({name: None for name in self.required if name not in chosen})
        return chosen


def hook_signature(cls: type, name: str) -> HookSignature | None:
    """How to call `cls.<name>` (None when the class does not define it)."""
    raw = inspect.getattr_static(cls, name, None)
    if raw is None:
        return None
    params = list(inspect.signature(getattr(cls, name)).parameters.values())
    if inspect.isfunction(raw) and params:  # a plain method: `self` is bound at call time
        params = params[1:]
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = [p for p in params if p.kind in keyword]
    return HookSignature(names=frozenset(p.name for p in named),
                         required=frozenset(p.name for p in named if p.default is p.empty),
                         takes_kwargs=any(p.kind is p.VAR_KEYWORD for p in params))


class ClassicNode(Node):
    """Base of every adapted class: delegates each call to one instance of `classic`."""

    classic: ClassVar[type]
    function: ClassVar[str]
    is_changed_hook: ClassVar[HookSignature | None] = None
    validate_hook: ClassVar[HookSignature | None] = None
    lazy_hook: ClassVar[HookSignature | None] = None
    validated_names: ClassVar[frozenset[str]] = frozenset()
    # hidden inputs of a kind the engine does not fill (a pack's own marker, e.g. a version):
    # ComfyUI passes them only when the prompt carries a value
    unfilled_hidden: ClassVar[frozenset[str]] = frozenset()
    per_node_instance: ClassVar[bool] = True  # classic objects may keep state, as in ComfyUI

    def __init__(self) -> None:
        self._classic_instance: Any = None

    def classic_instance(self) -> Any:
        """The wrapped classic object, created on first use and kept for this node."""
        if self._classic_instance is None:
            self._classic_instance = self.classic()
        return self._classic_instance

    def execute(self, ctx: NodeContext, **inputs: Any) -> NodeResult:
        blocker = execution_blocker(inputs.values())
        if blocker is not None:
            return blocked_result(self.schema, blocker)
        method = getattr(self.classic_instance(), self.function, None) if self.function else None
        if not callable(method):
            raise ClassicNodeError(f"node {self.schema.name!r}: FUNCTION is "
                                   f"{self.function or None!r}, which names no method of "
                                   f"{self.classic.__qualname__}; set FUNCTION to the method's "
                                   f"name")
        values = {name: to_pack(value) for name, value in inputs.items()
                  if value is not None or name not in self.unfilled_hidden}
        with running(ctx):
            result = classic_result(self.schema, self.function, method(**values))
        result.outputs = tuple(from_pack(value) for value in result.outputs)
        return result

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        return self._is_changed(ctx, inputs)

    def validate(self, ctx: NodeContext, **inputs: Any) -> str | None:
        assert self.validate_hook is not None  # only installed on classes with VALIDATE_INPUTS
        values = self._hook_values(ctx, inputs)
        if "input_types" in self.validate_hook.names:
            values["input_types"] = [{}] if self.schema.input_is_list else {}
        verdict = self._hook("VALIDATE_INPUTS")(**self.validate_hook.select(values))
        if verdict is True:
            return None
        if verdict is False or verdict is None:
            return f"VALIDATE_INPUTS returned {verdict}; return True for valid inputs"
        return str(verdict)

    @classmethod
    def self_validated_inputs(cls) -> frozenset[str]:
        return cls.validated_names

    def check_lazy(self, ctx: NodeContext, **inputs: Any) -> list[str]:
        assert self.lazy_hook is not None  # only installed on classes with check_lazy_status
        needed = self._hook("check_lazy_status")(**self.lazy_hook.select(inputs))
        return [str(name) for name in needed or ()]

    def _hook(self, name: str) -> Callable[..., Any]:
        """A hook as ComfyUI calls it: on the class when it is a class/static method."""
        if isinstance(inspect.getattr_static(self.classic, name), (classmethod, staticmethod)):
            return getattr(self.classic, name)
        return getattr(self.classic_instance(), name)

    def _hook_values(self, ctx: NodeContext, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Literal inputs plus the hidden ones known before execution, listed if INPUT_IS_LIST."""
        values = {spec.name: ctx.node_id for spec in self.schema.inputs
                  if spec.hidden and spec.type == "UNIQUE_ID"}
        values.update(inputs)
        if self.schema.input_is_list:
            return {name: [value] for name, value in values.items()}
        return values

    def _is_changed(self, ctx: NodeContext, inputs: Mapping[str, Any]) -> Any:
        """IS_CHANGED's verdict; NaN, or a failure (as in ComfyUI), means always re-run."""
        assert self.is_changed_hook is not None
        values = self.is_changed_hook.select(self._hook_values(ctx, inputs))
        try:
            changed = self._hook("IS_CHANGED")(**values)
        except Exception as exc:  # noqa: BLE001 - ComfyUI's rule: warn and treat as changed
            logger.warning("node %s (%s): IS_CHANGED raised %s: %s; it will re-run on every "
                           "prompt", ctx.node_id, self.schema.name, type(exc).__name__, exc)
            return ALWAYS_CHANGED
        if isinstance(changed, float) and math.isnan(changed):
            return ALWAYS_CHANGED
        return changed


BLOCKER_MARK = "__loom_execution_blocker__"  # set by comfy_execution.graph.ExecutionBlocker


def execution_blocker(values: Any) -> Any:
    """The first ExecutionBlocker among input values (or inside list inputs), if any."""
    for value in values:
        items = value if isinstance(value, list) else (value,)
        for item in items:
            if getattr(type(item), BLOCKER_MARK, False):
                return item
    return None


class BlockedExecution(RuntimeError):
    """An ExecutionBlocker with a message reached a node: ComfyUI fails the node with it."""


def blocked_result(schema: NodeSchema, blocker: Any) -> NodeResult:
    """ComfyUI's rule for a node fed an ExecutionBlocker: with a message it fails with that
    message; without one it does not run, and every output passes the blocker on."""
    message = getattr(blocker, "message", None)
    if message is not None:
        raise BlockedExecution(f"node {schema.name!r} was blocked: {message}")
    return NodeResult((blocker,) * len(schema.outputs), None)


def classic_result(schema: NodeSchema, function: str, returned: Any) -> NodeResult:
    """A classic return value (tuple, {"ui", "result", "expand"} dict, or None) as a
    NodeResult; with "expand", links among the results point into the expansion."""
    where = f"node {schema.name!r}: {function}()"
    if isinstance(returned, dict):
        ui = returned.get("ui")
        if ui is not None and not isinstance(ui, dict):
            raise TypeError(f"{where} returned a 'ui' of type {type(ui).__name__}; use a dict "
                            f"such as {{'text': [...]}}")
        result = returned.get("result")
        if getattr(type(result), BLOCKER_MARK, False):  # one blocker stands for every output
            result = (result,) * len(schema.outputs)
        if "expand" in returned:
            values = expansion_results(_as_tuple(where, result or (), schema))
            return NodeResult(values, ui, returned["expand"])
        if "result" not in returned:  # a UI-only return leaves the outputs empty
            return NodeResult((None,) * len(schema.outputs), ui)
        return NodeResult(_as_tuple(where, result, schema), ui)
    if returned is None and not schema.outputs:
        return NodeResult((), None)
    return NodeResult(_as_tuple(where, returned, schema), None)


def expansion_results(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """The results of an expanding node: each [node id, slot] list as an ExpansionLink."""
    return tuple(ExpansionLink(str(value[0]), value[1])
                 if isinstance(value, list) and is_link(value) else value for value in values)


def _as_tuple(where: str, values: Any, schema: NodeSchema) -> tuple[Any, ...]:
    """One value per declared output. ComfyUI indexes the returned tuple, so extra values are
    ignored and missing ones only fail where a link uses them: extras are cut here, and a
    missing one becomes None (with a warning)."""
    if not isinstance(values, (tuple, list)):
        raise TypeError(f"{where} returned {type(values).__name__}; return a tuple with one "
                        f"value per RETURN_TYPES entry, e.g. (result,)")
    count = len(schema.outputs)
    if len(values) < count:
        logger.warning("%s returned %d value(s) for %d outputs; the missing ones are None",
                       where, len(values), count)
    return tuple(values[:count]) + (None,) * (count - len(values))


def adapt_classic(class_type: str, cls: type, display_name: str | None,
                  module: str) -> type[Node]:
    """A Node subclass whose schema is read from a classic class and whose calls go to it."""
    if not isinstance(cls, type):
        raise ClassicNodeError(f"node {class_type!r} maps to {cls!r}, which is not a class; "
                               f"NODE_CLASS_MAPPINGS values must be node classes")
    function = _function_name(class_type, cls)
    schema = classic_schema(class_type, cls, display_name, module)
    namespace: dict[str, Any] = {
        "__module__": cls.__module__, "__doc__": f"Classic node {class_type} ({cls.__qualname__}).",
        "schema": schema, "classic": cls, "function": function,
        "is_changed_hook": hook_signature(cls, "IS_CHANGED"),
        "validate_hook": hook_signature(cls, "VALIDATE_INPUTS"),
        "lazy_hook": hook_signature(cls, "check_lazy_status"),
        "unfilled_hidden": frozenset(spec.name for spec in schema.hidden_inputs
                                     if spec.type not in HIDDEN_KINDS),
    }
    # Hooks a class lacks stay the base no-ops, so the engine knows to skip them.
    if namespace["is_changed_hook"] is None:
        namespace["fingerprint"] = Node.fingerprint
    if namespace["validate_hook"] is None:
        namespace["validate"] = Node.validate
    else:
        namespace["validated_names"] = _validated_names(schema, namespace["validate_hook"])
        namespace["validates_link_types"] = "input_types" in namespace["validate_hook"].names
    if namespace["lazy_hook"] is None:
        namespace["check_lazy"] = Node.check_lazy
    return type(f"Classic_{cls.__name__}", (ClassicNode,), namespace)


def _function_name(class_type: str, cls: type) -> str:
    """FUNCTION, checked when the node runs (ComfyUI registers classes whose FUNCTION is unset,
    e.g. display-only nodes, and fails only if one is executed)."""
    function = getattr(cls, "FUNCTION", None)
    return function if isinstance(function, str) else ""


def _validated_names(schema: NodeSchema, hook: HookSignature) -> frozenset[str]:
    """ComfyUI's rule: inputs VALIDATE_INPUTS takes (all, with **kwargs) skip built-in checks."""
    declared = frozenset(spec.name for spec in schema.inputs)
    return declared if hook.takes_kwargs else declared & hook.names


def classic_schema(class_type: str, cls: type, display_name: str | None,
                   module: str) -> NodeSchema:
    """The NodeSchema a classic class declares through its class attributes."""
    return NodeSchema(
        name=class_type,
        inputs=parse_input_types(class_type, classic_input_types(class_type, cls)),
        outputs=_parse_outputs(class_type, cls),
        category=str(getattr(cls, "CATEGORY", DEFAULT_CATEGORY)),
        display_name=display_name,
        description=str(getattr(cls, "DESCRIPTION", "") or ""),
        output_node=bool(getattr(cls, "OUTPUT_NODE", False)),
        idempotent=not getattr(cls, "NOT_IDEMPOTENT", False),
        input_is_list=bool(getattr(cls, "INPUT_IS_LIST", False)),
        deprecated=bool(getattr(cls, "DEPRECATED", False)),
        experimental=bool(getattr(cls, "EXPERIMENTAL", False)),
        python_module=module,
    )


def classic_input_types(class_type: str, cls: type) -> Any:
    """Call INPUT_TYPES as ComfyUI does (on the class), also when it is a plain method."""
    raw = inspect.getattr_static(cls, "INPUT_TYPES", None)
    if raw is None:
        raise ClassicNodeError(f"node {class_type!r}: {cls.__qualname__} has no INPUT_TYPES; "
                               f"add a classmethod returning {{'required': {{...}}}}")
    try:
        if inspect.isfunction(raw):
            return raw(cls) if inspect.signature(raw).parameters else raw()
        return cls.INPUT_TYPES()
    except Exception as exc:
        raise ClassicNodeError(f"node {class_type!r}: INPUT_TYPES() raised "
                               f"{type(exc).__name__}: {exc}") from exc


def parse_input_types(class_type: str, declared: Any) -> tuple[Input, ...]:
    """Inputs from an INPUT_TYPES dict: required, then optional, then hidden."""
    if not isinstance(declared, Mapping):
        raise ClassicNodeError(f"node {class_type!r}: INPUT_TYPES() returned "
                               f"{type(declared).__name__}; return a dict with 'required'")
    inputs = []
    for section in ("required", "optional", "hidden"):
        entries = declared.get(section) or {}
        if not isinstance(entries, Mapping):
            raise ClassicNodeError(f"node {class_type!r}: INPUT_TYPES()[{section!r}] is "
                                   f"{type(entries).__name__}; use a dict of name: spec")
        for name, spec in entries.items():
            if any(existing.name == str(name) for existing in inputs):
                logger.debug("node %r declares input %r in two sections; the first wins",
                             class_type, name)
                continue
            if section == "hidden":
                inputs.append(_parse_hidden(class_type, name, spec))
            else:
                inputs.append(_parse_input(class_type, name, spec, section == "optional"))
    return tuple(inputs)


def _parse_hidden(class_type: str, name: str, kind: Any) -> Input:
    """A hidden input: a kind string ('PROMPT', 'UNIQUE_ID' ...); ComfyUI also accepts other
    specs there (ignored by its editor), so a (TYPE, options) tuple keeps its TYPE."""
    if isinstance(kind, (tuple, list)) and kind:
        kind = kind[0] if isinstance(kind[0], str) else "COMBO"
    if not isinstance(kind, str):
        raise ClassicNodeError(f"node {class_type!r}: hidden input {name!r} is {kind!r}; use a "
                               f"kind string such as 'PROMPT' or 'UNIQUE_ID'")
    return Input(str(name), str(kind), hidden=True)


def _parse_input(class_type: str, name: str, spec: Any, optional: bool) -> Input:
    """One (TYPE, options) entry; TYPE a type name or a list of combo choices."""
    if not isinstance(spec, (tuple, list)) or not spec:
        raise ClassicNodeError(f"node {class_type!r}: input {name!r} is {spec!r}; declare it as "
                               f"(TYPE,) or (TYPE, {{options}})")
    options = spec[1] if len(spec) > 1 and spec[1] is not None else {}
    if not isinstance(options, Mapping):
        raise ClassicNodeError(f"node {class_type!r}: options of input {name!r} are {options!r}; "
                               f"use a dict")
    rest = dict(options)
    fields = _take_fields(rest)
    io_type = spec[0]
    if isinstance(io_type, (list, tuple)):
        return Input(str(name), "COMBO", choices=tuple(io_type), optional=optional,
                     options=rest, **fields)
    if not isinstance(io_type, str):
        raise ClassicNodeError(f"node {class_type!r}: input {name!r} has type {io_type!r}; use a "
                               f"type name string or a list of combo choices")
    io_type = str(io_type)  # a str subclass equal to everything (packs' "any type") is its text
    if io_type == "COMBO":
        choices = tuple(rest.pop("options", ()))
        return Input(str(name), "COMBO", choices=choices, optional=optional, options=rest,
                     combo_style="v3", **fields)
    return Input(str(name), str(io_type), optional=optional, options=rest, **fields)


def _take_fields(rest: dict[str, Any]) -> dict[str, Any]:
    """Move the options Input has fields for out of `rest`; the others stay verbatim."""
    fields: dict[str, Any] = {}
    if "default" in rest:
        fields["default"] = rest.pop("default")
    for key in _NUMERIC_KEYS:
        if rest.get(key) is not None:
            fields[key] = rest.pop(key)
    if isinstance(rest.get("tooltip"), str) and rest["tooltip"]:
        fields["tooltip"] = rest.pop("tooltip")
    if rest.get("lazy") is True:
        fields["lazy"] = rest.pop("lazy")
    return fields


def _parse_outputs(class_type: str, cls: type) -> tuple[Output, ...]:
    """RETURN_TYPES with RETURN_NAMES, OUTPUT_IS_LIST and OUTPUT_TOOLTIPS (shorter ones padded)."""
    types = getattr(cls, "RETURN_TYPES", None)
    if isinstance(types, str) or not isinstance(types, (tuple, list)):
        raise ClassicNodeError(f"node {class_type!r}: RETURN_TYPES is {types!r}; use a tuple "
                               f"such as ('IMAGE',) or () for a node without outputs")
    names = tuple(getattr(cls, "RETURN_NAMES", None) or ())
    is_list = tuple(getattr(cls, "OUTPUT_IS_LIST", None) or ())
    tooltips = tuple(getattr(cls, "OUTPUT_TOOLTIPS", None) or ())
    outputs = []
    for slot, io_type in enumerate(types):
        outputs.append(Output(
            type="COMBO" if isinstance(io_type, (list, tuple)) else str(io_type),
            name=str(names[slot]) if slot < len(names) else None,
            is_list=bool(is_list[slot]) if slot < len(is_list) else False,
            tooltip=tooltips[slot] if slot < len(tooltips) and tooltips[slot] else None))
    return tuple(outputs)
