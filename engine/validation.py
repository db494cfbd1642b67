"""Prompt validation that reports every problem at once, in ComfyUI's JSON error shape:
{"error": {type, message, details, extra_info}, "node_errors": {id: {errors, dependent_outputs,
class_type}}}. Each step is a named function; `validate_prompt` runs them in order."""

from __future__ import annotations

import dataclasses
import difflib
import math
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from engine.context import InterruptFlag, NodeContext, Services
from engine.dynamic_inputs import MATCH_TYPE
from engine.gc_scope import older_objects_frozen
from engine.graph import CycleError, GraphPlanner, Prompt, PromptEdit, PromptNode, parse_node
from engine.node import MISSING, ChoiceSource, Input, Node, NodeSchema
from engine.registry import NodeRegistry
from engine.schema import input_spec
from engine.snapshot import PromptSnapshot
from engine.widget_defaults import fill_missing_widgets


@dataclass
class ValidationResult:
    """Outcome of validation: what can run, and every problem found."""

    prompt: Prompt
    outputs: list[str]
    error: dict[str, Any] | None = None
    node_errors: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        return {"error": self.error, "node_errors": self.node_errors}


def types_match(received: str, expected: str) -> bool:
    """ComfyUI's link type rule: '*' matches anything; 'A,B' unions match any member; a V3
    MatchType side matches anything too (the editor keeps its sockets consistent)."""
    if received == expected or "*" in (received, expected) or MATCH_TYPE in (received, expected):
        return True
    return bool(set(received.split(",")) & set(expected.split(",")))


def error_entry(kind: str, message: str, details: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def closest(value: Any, choices: list[str], count: int = 3) -> list[str]:
    return difflib.get_close_matches(str(value), [str(c) for c in choices], n=count, cutoff=0.6)


class _Collector:
    """Node errors gathered during validation, keyed by node id."""

    def __init__(self, prompt: Prompt) -> None:
        self.prompt = prompt
        self.errors: dict[str, list[dict[str, Any]]] = {}

    def add(self, node_id: str, entry: dict[str, Any]) -> None:
        self.errors.setdefault(node_id, []).append(entry)


def validate_class_types(prompt: Prompt, registry: NodeRegistry, out: _Collector) -> list[str]:
    """Every node names a known class_type; returns the ids of unknown or untyped nodes."""
    bad = []
    known = list(registry)
    for node in prompt.nodes.values():
        if not isinstance(node.class_type, str) or not node.class_type:
            out.add(node.node_id, error_entry(
                "missing_class_type", "Node is missing the class_type property",
                f"Node ID '#{node.node_id}': add \"class_type\" naming a node type"))
            bad.append(node.node_id)
        elif node.class_type not in registry:
            hint = closest(node.class_type, known)
            fix = (f"did you mean {hint}?" if hint
                   else "install the custom-node pack that provides it")
            out.add(node.node_id, error_entry(
                "missing_node_type", f"Node type {node.class_type!r} does not exist",
                f"Node ID '#{node.node_id}': {fix}", class_type=node.class_type, closest=hint))
            bad.append(node.node_id)
    return bad


def find_output_nodes(prompt: Prompt, registry: NodeRegistry,
                      targets: Iterable[str] | None = None) -> list[str]:
    """Output nodes of the prompt (or the requested targets that are output nodes)."""
    wanted = set(targets) if targets else None
    outputs = []
    for node in prompt.nodes.values():
        node_type = registry.get(node.class_type) if isinstance(node.class_type, str) else None
        if node_type and node_type.schema.output_node:
            if wanted is None or node.node_id in wanted:
                outputs.append(node.node_id)
    return outputs


def validate_links(node: PromptNode, node_type: type[Node], prompt: Prompt,
                   registry: NodeRegistry, out: _Collector) -> None:
    """Each link names an existing node and output slot of a type the input accepts."""
    schema = node_type.schema
    for name, (source_id, slot) in node.links.items():
        spec = schema.input(name)
        source = prompt.nodes.get(source_id)
        source_type = registry.get(source.class_type) if source and isinstance(
            source.class_type, str) else None
        if source is None or source_type is None:
            reason = (f"input {name!r} links to node {source_id!r}, which does not exist" if source
                      is None else f"input {name!r} links to node {source_id!r} of unknown type")
            out.add(node.node_id, _exception_entry(name, ValueError(reason)))
            continue
        outputs = source_type.schema.outputs
        if not 0 <= slot < len(outputs):
            reason = (f"input {name!r} links to output {slot} of node {source_id} "
                      f"({source.class_type}), which has {len(outputs)} output(s)")
            out.add(node.node_id, _exception_entry(name, IndexError(reason)))
            continue
        if spec is None or spec.hidden or node_type.validates_link_types:
            continue
        received = outputs[slot].type
        expected = "COMBO" if spec.type == "COMBO" else spec.type
        if not types_match(received, expected):
            out.add(node.node_id, error_entry(
                "return_type_mismatch", "Return type mismatch between linked nodes",
                f"{name}, received_type({received}) mismatch input_type({expected})",
                input_name=name, input_config=input_spec(spec), received_type=received,
                linked_node=[source_id, slot]))


def _exception_entry(input_name: str, exc: Exception) -> dict[str, Any]:
    return error_entry("exception_during_validation", "Exception when validating node", str(exc),
                       input_name=input_name, exception_type=type(exc).__name__,
                       traceback=traceback.format_exception_only(type(exc), exc))


def coerce_literal(spec: Input, value: Any) -> Any:
    """Convert a literal to the input's type (ComfyUI converts "5" -> 5 for INT)."""
    if spec.type == "INT":
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{value} is not a whole number")
        return int(value)
    if spec.type == "FLOAT":
        result = float(value)
        if math.isnan(result):
            raise ValueError("NaN is not a valid number")
        return result
    if spec.type == "STRING":
        return str(value) if not isinstance(value, (dict, list)) else value
    if spec.type == "BOOLEAN":
        if isinstance(value, str):
            if value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ValueError(f"{value!r} is not true or false")
        return bool(value)
    return value


def _try_coerce(spec: Input, value: Any) -> Any:
    """Convert when possible; the node's own validation judges values that do not convert."""
    try:
        return coerce_literal(spec, value)
    except (TypeError, ValueError, OverflowError):
        return value


def validate_literal(node: PromptNode, spec: Input, value: Any, env: Any,
                     out: _Collector) -> Any:
    """Type, range and choice checks for one literal value; returns the converted value."""
    node_id, name = node.node_id, spec.name
    try:
        value = coerce_literal(spec, value)
    except (TypeError, ValueError, OverflowError) as exc:
        out.add(node_id, error_entry(
            "invalid_input_type", f"Failed to convert an input value to a {spec.type} value",
            f"{name}, {value}, {exc}", input_name=name, input_config=input_spec(spec, env),
            received_value=value, exception_message=str(exc)))
        return MISSING
    if spec.type in ("INT", "FLOAT"):
        if spec.min is not None and value < spec.min:
            out.add(node_id, _range_entry("value_smaller_than_min", "smaller than min", spec,
                                          value, spec.min, env))
        if spec.max is not None and value > spec.max:
            out.add(node_id, _range_entry("value_bigger_than_max", "bigger than max", spec,
                                          value, spec.max, env))
    elif spec.type == "COMBO":
        choices = spec.resolved_choices(env) or []
        if value not in choices:
            shown = choices if len(choices) <= 20 else choices[:20] + ["..."]
            hint = closest(value, choices)
            fix = f"; did you mean {hint}?" if hint else (
                "; the list is empty: add a file to that folder" if not choices else "")
            out.add(node_id, error_entry(
                "value_not_in_list", "Value not in list",
                f"{name}: '{value}' not in {shown}{fix}", input_name=name,
                input_config=input_spec(spec, env), received_value=value, closest=hint))
    return value


def _range_entry(kind: str, words: str, spec: Input, value: Any, bound: Any,
                 env: Any) -> dict[str, Any]:
    return error_entry(kind, f"Value {value} {words} of {bound}", f"{spec.name}",
                       input_name=spec.name, input_config=input_spec(spec, env),
                       received_value=value)


def validate_node_inputs(node: PromptNode, schema: NodeSchema, env: Any, out: _Collector,
                         custom_validated: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Required inputs present; literals well-typed and in range. Returns converted literals."""
    converted: dict[str, Any] = {}
    for spec in schema.concrete_inputs(node.literals):
        if spec.hidden or spec.name in node.links:
            continue
        if spec.name not in node.literals:
            if not spec.optional:
                out.add(node.node_id, error_entry(
                    "required_input_missing", "Required input is missing", spec.name,
                    input_name=spec.name))
            continue
        value = node.literals[spec.name]
        if spec.name in custom_validated:
            converted[spec.name] = _try_coerce(spec, value)
            continue
        if not spec.is_widget and spec.type != "COMBO":
            converted[spec.name] = value
            continue
        result = validate_literal(node, spec, value, env, out)
        if result is not MISSING:
            converted[spec.name] = result
    for name, value in node.literals.items():
        converted.setdefault(name, value)  # extra inputs pass through, as ComfyUI does
    return converted


def validate_acyclic(prompt: Prompt, outputs: list[str], out: _Collector,
                     planner: GraphPlanner | None) -> None:
    """No dependency cycles among the nodes that would run (the order is kept for the run)."""
    try:
        prompt.order_for(outputs, planner)
        return
    except CycleError as error:
        cycle = error.cycle
    path = " -> ".join(cycle)
    for node_id in set(cycle):
        out.add(node_id, error_entry(
            "dependency_cycle", "Dependency cycle detected",
            f"{path}: remove one of these links", cycle=cycle))


def validate_custom(node: PromptNode, node_type: type[Node], literals: dict[str, Any],
                    services: Services, out: _Collector) -> None:
    """The node's own checks (Node.validate, ComfyUI's VALIDATE_INPUTS)."""
    if node_type.validate is Node.validate:
        return
    ctx = NodeContext(node_id=node.node_id, class_type=node.class_type, prompt_id="",
                      services=services, interrupt=InterruptFlag())
    try:
        verdict = node_type().validate(ctx, **literals)
    except Exception as exc:  # noqa: BLE001 - reported to the user as a validation error
        out.add(node.node_id, _exception_entry("", exc))
        return
    if verdict is None or verdict is True:
        return
    name, message = verdict if isinstance(verdict, tuple) else ("", str(verdict))
    details = f"{name} - {message}" if name else message
    out.add(node.node_id, error_entry("custom_validation_failed",
                                      "Custom validation failed for node", details,
                                      input_name=name))


def validate_prompt(api: dict[str, Any], registry: NodeRegistry, services: Services,
                    targets: Iterable[str] | None = None) -> ValidationResult:
    """Validate an API-format prompt against the registry; `targets` limits the outputs run."""
    return PromptValidator(registry, services).validate(api, targets)


def validate_node(node: PromptNode, node_type: type[Node], prompt: Prompt,
                  registry: NodeRegistry, services: Services, out: _Collector) -> None:
    """Links, literal inputs, then (if those passed) the node's own checks; the node's
    literals become the converted values ("5" -> 5), which are what will run."""
    fill_missing_widgets(node, node_type.schema)
    validate_links(node, node_type, prompt, registry, out)
    errors_before = len(out.errors.get(node.node_id, ()))
    literals = validate_node_inputs(node, node_type.schema, services, out,
                                    node_type.self_validated_inputs())
    if len(out.errors.get(node.node_id, ())) == errors_before:
        validate_custom(node, node_type, literals, services, out)
    node.literals = literals


@dataclass(frozen=True)
class _Verdicts:
    """The last prompt validated, and its nodes whose verdict can be reused: those that passed
    and whose verdict depends on their own body alone (see PromptValidator)."""

    snapshot: PromptSnapshot
    prompt: Prompt
    targets: tuple[str, ...] | None
    outputs: list[str]
    lasting: dict[str, PromptNode]
    rechecked: list[str]  # the other nodes the outputs need: checked for every prompt


class PromptValidator:
    """Validates prompts against a registry, remembering the last one (the editor posts the
    same graph again and again with a widget changed). A node whose body is unchanged keeps its
    verdict, unless the verdict may change without the prompt changing: combos over files and
    nodes with their own checks (Node.validate, VALIDATE_INPUTS) are checked every time, and a
    link is checked again when its source node changed class. With the same nodes and links,
    the outputs and the execution order are reused too. Not thread-safe: one caller at a time."""

    def __init__(self, registry: NodeRegistry, services: Services) -> None:
        self.registry = registry
        self.services = services
        self._last: _Verdicts | None = None
        self._lasting_types: dict[type[Node], bool] = {}

    def validate(self, api: dict[str, Any], targets: Iterable[str] | None = None,
                 snapshot: PromptSnapshot | None = None) -> ValidationResult:
        """Validate an API-format prompt; `targets` limits the outputs run. `snapshot`: the
        prompt's, when the caller has made one."""
        wanted = tuple(targets) if targets else None
        with older_objects_frozen():
            return self._validate(api, wanted, snapshot)

    def _validate(self, api: dict[str, Any], targets: tuple[str, ...] | None,
                  snapshot: PromptSnapshot | None) -> ValidationResult:
        if not isinstance(api, dict) or not all(map(isinstance, api.values(), repeat(dict))):
            result = ValidationResult(Prompt(nodes={}), [])
            result.error = error_entry(
                "invalid_prompt", "Prompt must be an object of node objects",
                "send {\"<id>\": {\"class_type\": ..., \"inputs\": {...}}}")
            return result
        if not set(map(type, api)) <= {str}:
            api = {str(node_id): body for node_id, body in api.items()}
        snapshot = snapshot if snapshot is not None else PromptSnapshot(api)
        last = self._last
        if last is not None and last.targets == targets and snapshot.same_as(last.snapshot):
            return self._validate_again(api, snapshot, last)
        reused, same_shape, changed = self._reusable(api, snapshot)
        prompt = Prompt.parse(api, known=reused)
        if last is not None:
            prompt.edit = PromptEdit(last.prompt.nodes, changed)
        out = _Collector(prompt)
        if same_shape and last is not None and last.targets == targets:
            prompt.adopt_plans(last.prompt)  # same nodes and links: same order, same outputs
            unknown: list[str] = []
            outputs = list(last.outputs)
        else:
            unknown = validate_class_types(prompt, self.registry, out)
            outputs = find_output_nodes(prompt, self.registry, targets)
        needed = prompt.required_nodes(outputs)
        validate_acyclic(prompt, outputs, out, self.services.graph_planner)
        checked = [node_id for node_id in api if node_id not in reused and node_id in needed
                   and node_id not in unknown]
        for node_id in checked:
            node = prompt.nodes[node_id]
            node_type = self.registry.get(node.class_type)
            if node_type is not None:
                validate_node(node, node_type, prompt, self.registry, self.services, out)
        result = _summarise(prompt, outputs, unknown, out)
        self._remember(snapshot, prompt, targets, outputs, unknown, reused, checked, out)
        return result

    def _validate_again(self, api: dict[str, Any], snapshot: PromptSnapshot,
                        last: _Verdicts) -> ValidationResult:
        """The last prompt again: only the nodes checked every time are checked."""
        nodes = dict(last.prompt.nodes)
        for node_id in last.rechecked:
            nodes[node_id] = parse_node(node_id, api[node_id])
        prompt = Prompt(nodes=nodes, raw=dict(api), edit=PromptEdit(last.prompt.nodes, frozenset()))
        prompt.adopt_plans(last.prompt)
        out = _Collector(prompt)
        validate_acyclic(prompt, last.outputs, out, self.services.graph_planner)
        for node_id in last.rechecked:
            node = nodes[node_id]
            node_type = self.registry.get(node.class_type)
            if node_type is not None:
                validate_node(node, node_type, prompt, self.registry, self.services, out)
        self._last = dataclasses.replace(last, snapshot=snapshot, prompt=prompt)
        return _summarise(prompt, list(last.outputs), [], out)

    def _reusable(self, api: dict[str, Any], snapshot: PromptSnapshot,
                  ) -> tuple[dict[str, PromptNode], bool, frozenset[str]]:
        """The nodes whose last verdict still holds, whether nodes and links are the same, and
        the nodes whose body changed (or that are new) since the last prompt."""
        last = self._last
        if last is None:
            return {}, False, frozenset(api)
        if snapshot.same_as(last.snapshot):
            return last.lasting, True, frozenset()
        before_nodes = last.prompt.nodes
        changed = snapshot.changed_since(last.snapshot)
        dropped = set(changed)
        reused = {node_id: node for node_id, node in last.lasting.items()
                  if node_id not in dropped and node_id in api}
        same_shape = len(api) == len(before_nodes) and all(
            node_id in before_nodes
            and _same_wiring(before_nodes[node_id], parse_node(node_id, api[node_id]))
            for node_id in changed)
        if not same_shape:
            reused = {node_id: node for node_id, node in reused.items()
                      if _sources_unchanged(node, api, before_nodes)}
        return reused, same_shape, frozenset(changed)

    def _remember(self, snapshot: PromptSnapshot, prompt: Prompt,
                  targets: tuple[str, ...] | None,
                  outputs: list[str], unknown: list[str], reused: dict[str, PromptNode],
                  checked: list[str], out: _Collector) -> None:
        if unknown:
            self._last = None  # the next prompt is checked in full
            return
        lasting = dict(reused)
        rechecked = []
        for node_id in checked:
            node = prompt.nodes[node_id]
            node_type = self.registry.get(node.class_type)
            if node_id not in out.errors and node_type is not None and self._lasts(node_type):
                lasting[node_id] = node
            else:
                rechecked.append(node_id)
        self._last = _Verdicts(snapshot, prompt, targets, outputs, lasting, rechecked)

    def _lasts(self, node_type: type[Node]) -> bool:
        """Whether a node's verdict depends on its body alone (memoised per type)."""
        lasts = self._lasting_types.get(node_type)
        if lasts is None:
            own_checks = node_type.validate is not Node.validate
            file_combos = any(isinstance(spec.choices, ChoiceSource)
                              for spec in node_type.schema.inputs)
            lasts = self._lasting_types[node_type] = not (own_checks or file_combos)
        return lasts


def _same_wiring(before: PromptNode, node: PromptNode) -> bool:
    """Same class and the same links (literal inputs may differ)."""
    return before.class_type == node.class_type and before.links == node.links


def _sources_unchanged(node: PromptNode, api: dict[str, Any],
                       before_nodes: dict[str, PromptNode]) -> bool:
    """Whether every node `node` links to still exists with the class it had."""
    for source_id, _ in node.links.values():
        source, before = api.get(source_id), before_nodes.get(source_id)
        if source is None or before is None or source.get("class_type") != before.class_type:
            return False
    return True


def _summarise(prompt: Prompt, outputs: list[str], unknown: list[str],
               out: _Collector) -> ValidationResult:
    node_errors = {}
    bad_outputs = set()
    for output in outputs if out.errors else ():
        failed = [n for n in prompt.required_nodes([output]) if n in out.errors]
        bad_outputs.update([output] if failed else [])
        for node_id in failed:
            entry = node_errors.setdefault(node_id, {
                "errors": out.errors[node_id], "dependent_outputs": [],
                "class_type": prompt.nodes[node_id].class_type})
            entry["dependent_outputs"].append(output)
    for node_id in unknown:  # unknown nodes outside any output's reach are still reported
        node_errors.setdefault(node_id, {"errors": out.errors[node_id], "dependent_outputs": [],
                                         "class_type": prompt.nodes[node_id].class_type})
    good = [o for o in outputs if o not in bad_outputs]
    result = ValidationResult(prompt, good, node_errors=node_errors)
    if unknown:
        first = prompt.nodes[unknown[0]]
        what = (f"node {first.class_type} does not exist" if isinstance(first.class_type, str)
                and first.class_type else "a node is missing the class_type property")
        result.error = error_entry("invalid_prompt", f"Cannot execute because {what}.",
                                   f"Node ID '#{first.node_id}'")
    elif not outputs:
        result.error = error_entry("prompt_no_outputs", "Prompt has no outputs",
                                   "add an output node such as SaveImage or PreviewImage")
    elif not good:
        result.error = error_entry("prompt_outputs_failed_validation",
                                   "Prompt outputs failed validation", _first_details(node_errors))
    return result


def _first_details(node_errors: dict[str, dict[str, Any]]) -> str:
    errors = [e for entry in node_errors.values() for e in entry["errors"]]
    if len(errors) != 1:
        return ""
    return f"{errors[0]['message']}: {errors[0]['details']}"
