"""Batch sweeps: a grid or list of widget overrides expanded into one prompt each, with every
`filename_prefix` extended by the overrides so each prompt's outputs are named by them.

Used by `main.py run --sweep NODE.INPUT=SPEC` and by POST /prompt's `loom_sweep` extension.
A SPEC is `A..B` or `A..B:STEP` (integers, both ends included), `[JSON list]`, `@FILE` (one
value per line; command line only) or a single value. Values are read as JSON when they
parse, else as text (like `--set`)."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.cli import Override, UsageError, apply_overrides

MAX_SWEEP_PROMPTS = 10_000  # a typo like 1..1000000 should be an error, not a million prompts
PREFIX_INPUT = "filename_prefix"
_RANGE = re.compile(r"^\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*(?::\s*(-?\d+)\s*)?$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")
LABEL_VALUE_CHARS = 40


class SweepError(UsageError):
    """A sweep that cannot be expanded; the message names the axis and the fix."""


@dataclass(frozen=True)
class SweepAxis:
    """One swept widget: `node_id.input_name` takes each of `values` in turn."""

    node_id: str
    input_name: str
    values: tuple[Any, ...]

    @property
    def target(self) -> str:
        return f"{self.node_id}.{self.input_name}"


@dataclass(frozen=True)
class SweepItem:
    """One expanded prompt: its overrides (target -> value), their label and the API graph."""

    index: int
    overrides: dict[str, Any]
    label: str
    prompt: dict[str, Any] = field(repr=False)


def parse_value(text: str) -> Any:
    """JSON when it parses (42, 1.5, true, "x"), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def split_target(target: str, where: str) -> tuple[str, str]:
    node_id, dot, input_name = target.strip().partition(".")
    if not dot or not node_id or not input_name:
        raise SweepError(f"{where} {target!r}: expected NODE_ID.INPUT, e.g. 3.seed")
    return node_id, input_name


def parse_range(spec: str) -> tuple[int, ...] | None:
    """`A..B` or `A..B:STEP` as the integers from A to B inclusive; None if not a range."""
    match = _RANGE.match(spec)
    if match is None:
        return None
    start, stop = int(match.group(1)), int(match.group(2))
    step = int(match.group(3)) if match.group(3) else (1 if stop >= start else -1)
    if step == 0 or (stop - start) * step < 0:
        raise SweepError(f"range {spec!r} never reaches its end with step {step}; use e.g. "
                         f"1..64 or 64..1:-1")
    return tuple(range(start, stop + (1 if step > 0 else -1), step))


def read_value_file(path: Path, where: str) -> tuple[Any, ...]:
    """One value per non-empty line of a text file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SweepError(f"{where}: cannot read {path} ({exc}); give a UTF-8 text file with one "
                         f"value per line") from exc
    values = tuple(parse_value(line.strip()) for line in lines if line.strip())
    if not values:
        raise SweepError(f"{where}: {path} has no values; put one value per line")
    return values


def parse_spec(spec: str, where: str, *, files: bool) -> tuple[Any, ...]:
    """The values of one SPEC (see the module docstring); `files` allows @FILE."""
    if spec.startswith("@"):
        if not files:
            raise SweepError(f"{where}: @FILE values are read only on the command line; send "
                             f"the values as a JSON list")
        return read_value_file(Path(spec[1:]).expanduser(), where)
    numbers = parse_range(spec)
    if numbers is not None:
        return numbers
    value = parse_value(spec)
    return tuple(value) if isinstance(value, list) else (value,)


def parse_axis(text: str) -> SweepAxis:
    """One `--sweep NODE_ID.INPUT=SPEC`."""
    target, sep, spec = text.partition("=")
    if not sep:
        raise SweepError(f"--sweep {text!r}: expected NODE_ID.INPUT=SPEC, e.g. 3.seed=1..64 or "
                         f"6.text=@prompts.txt")
    node_id, input_name = split_target(target, "--sweep")
    values = parse_spec(spec, f"--sweep {target}", files=True)
    if not values:
        raise SweepError(f"--sweep {target}: no values; give a range, a list or a value")
    return SweepAxis(node_id, input_name, values)


def combinations(axes: Sequence[SweepAxis], zipped: bool) -> list[dict[str, Any]]:
    """Every grid point (first axis slowest), or with `zipped` the i-th value of each axis."""
    if zipped:
        lengths = {axis.target: len(axis.values) for axis in axes}
        if len(set(lengths.values())) > 1:
            raise SweepError(f"zipped sweep axes must have equal lengths, got {lengths}; give "
                             f"each the same number of values or sweep as a grid")
        rows = zip(*(axis.values for axis in axes), strict=True)
    else:
        total = 1
        for axis in axes:
            total *= len(axis.values)
        check_count(total)
        rows = itertools.product(*(axis.values for axis in axes))
    return [{axis.target: value for axis, value in zip(axes, row, strict=True)} for row in rows]


def check_count(count: int) -> None:
    if count > MAX_SWEEP_PROMPTS:
        raise SweepError(f"the sweep expands to {count} prompts, more than {MAX_SWEEP_PROMPTS}; "
                         f"sweep fewer values or split it into several runs")


def label_for(overrides: Mapping[str, Any]) -> str:
    """`3.seed=1_6.text=a-red-fox`: the overrides, safe to put in a file name."""
    parts = []
    for target, value in overrides.items():
        shown = value if isinstance(value, str) else json.dumps(value)
        shown = _UNSAFE.sub("-", shown).strip("-")[:LABEL_VALUE_CHARS] or "-"
        parts.append(f"{_UNSAFE.sub('-', target)}={shown}")
    return "_".join(parts)


def named_outputs(api: dict[str, Any], label: str) -> dict[str, Any]:
    """The prompt with `_<label>` appended to every literal `filename_prefix`."""
    for body in api.values():
        inputs = body.get("inputs") if isinstance(body, dict) else None
        if isinstance(inputs, dict) and isinstance(inputs.get(PREFIX_INPUT), str):
            inputs[PREFIX_INPUT] = f"{inputs[PREFIX_INPUT]}_{label}"
    return api


def expand(api: dict[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[SweepItem]:
    """One SweepItem per row of overrides (target -> value), applied to a copy of `api`."""
    check_count(len(rows))
    items = []
    for index, row in enumerate(rows):
        overrides = [override_for(api, target, value) for target, value in row.items()]
        label = label_for(row)
        prompt = apply_overrides(api, overrides)
        items.append(SweepItem(index, dict(row), label,
                               named_outputs(prompt, label) if label else prompt))
    return items


def override_for(api: dict[str, Any], target: str, value: Any) -> Override:
    node_id, input_name = split_target(target, "sweep")
    if node_id not in api:
        known = ", ".join(sorted(api, key=lambda n: (len(n), n)))
        raise SweepError(f"sweep {target}: the workflow has no node {node_id!r} (its nodes: "
                         f"{known})")
    return Override(node_id, input_name, value)


def rows_from_request(sweep: Any) -> list[dict[str, Any]]:
    """POST /prompt's `loom_sweep`: {"grid": {target: values}}, {"zip": {target: values}} or
    {"list": [{target: value, ...}, ...]}; values are a JSON list or an `A..B[:STEP]` range."""
    if not isinstance(sweep, dict) or len(sweep) != 1 or next(iter(sweep)) not in (
            "grid", "zip", "list"):
        raise SweepError('loom_sweep must be one of {"grid": {"3.seed": [1, 2]}}, '
                         '{"zip": {...}} or {"list": [{"3.seed": 1}, ...]}')
    mode, body = next(iter(sweep.items()))
    if mode == "list":
        if not isinstance(body, list) or not body or not all(isinstance(r, dict) for r in body):
            raise SweepError("loom_sweep.list must be a non-empty list of {\"NODE.INPUT\": "
                             "value} objects")
        return [dict(row) for row in body]
    if not isinstance(body, dict) or not body:
        raise SweepError(f"loom_sweep.{mode} must map NODE.INPUT to a list of values or a "
                         f"range such as \"1..64\"")
    axes = [SweepAxis(*split_target(target, f"loom_sweep.{mode}"),
                      _request_values(values, f"loom_sweep.{mode}.{target}"))
            for target, values in body.items()]
    return combinations(axes, zipped=mode == "zip")


def _request_values(values: Any, where: str) -> tuple[Any, ...]:
    if isinstance(values, list) and values:
        return tuple(values)
    if isinstance(values, str):
        numbers = parse_range(values)
        if numbers is not None:
            return numbers
    raise SweepError(f"{where} is {values!r}; give a non-empty JSON list or a range like \"1..64\"")
