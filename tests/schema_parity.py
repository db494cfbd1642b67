"""Compare a node type's generated `/object_info` entry with ComfyUI's recorded one
(tests/data/compat/object_info_full.json: all 445 built-ins of ComfyUI 0.8), field by field.
Shared by every node family's tests."""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest

from engine.node import ChoiceSource, Input, Node, NodeSchema
from engine.schema import object_info_entry
from tests.recorded import data_json

# The recording under tests/data of all 445 built-ins of ComfyUI 0.8 (its 90 core entries
# are also in object_info_core.json, identical).
REFERENCE_FILE = "compat/object_info_full.json"
FULL_REFERENCE_FILE = REFERENCE_FILE
# Top-level fields compared as they are (display_name has its own rule).
PLAIN_FIELDS = ("output", "output_is_list", "output_name", "name", "category", "output_node")
# Fields compared where the recording kept them (its 90 core entries were stripped of them);
# a classic node's entry leaves them out, read as the value beside.
OPTIONAL_FIELDS = (("deprecated", False), ("experimental", False), ("output_matchtypes", None))
# Option keys the recording left out (tooltips were stripped from it).
UNRECORDED_OPTIONS = frozenset({"tooltip"})


@cache
def reference_entries(reference: str = REFERENCE_FILE) -> dict[str, Any]:
    """Every entry of tests/data/<reference> by class type (read once; do not change it)."""
    return data_json(reference)


def reference_entry(class_type: str, reference: str = REFERENCE_FILE) -> dict[str, Any]:
    """ComfyUI's recorded entry for `class_type` in tests/data/<reference>."""
    entries = reference_entries(reference)
    if class_type not in entries:
        pytest.fail(f"{class_type!r} is not in {reference}; check the node name")
    return entries[class_type]


def _file_placeholder(choices: list[Any]) -> str | None:
    """"<files in X>" when the recorded choice list stands for a folder's files."""
    if len(choices) == 1 and isinstance(choices[0], str) and choices[0].startswith("<files in "):
        return choices[0]
    return None


def _choice_differences(where: str, spec: Input, recorded: list[Any]) -> list[str]:
    """A combo's choices: a file list must be a ChoiceSource of the same folder placeholder."""
    placeholder = _file_placeholder(recorded)
    ours = spec.choices
    if isinstance(ours, ChoiceSource):
        if placeholder is not None and ours.placeholder() == placeholder:
            return []
        if placeholder is None and not recorded:
            return []  # recorded from an empty folder: any file list matches
        return [f"{where}: choices are {ours.placeholder()}, reference {recorded}"]
    if list(ours or ()) != list(recorded):
        return [f"{where}: choices {list(ours or ())} != reference {recorded}"]
    return []


def _same_value(ours: Any, recorded: Any) -> bool:
    """Equal, and booleans only equal booleans (True == 1 in Python, not in a schema)."""
    return ours == recorded and isinstance(ours, bool) == isinstance(recorded, bool)


def _option_differences(where: str, ours: dict[str, Any], recorded: dict[str, Any],
                        skip: frozenset[str] = frozenset()) -> list[str]:
    problems = []
    for key in sorted((set(ours) | set(recorded)) - UNRECORDED_OPTIONS - skip):
        if key not in recorded:
            problems.append(f"{where}: option {key}={ours[key]!r} is not in the reference")
        elif key not in ours:
            problems.append(f"{where}: option {key} missing (reference {recorded[key]!r})")
        elif not _same_value(ours[key], recorded[key]):
            problems.append(f"{where}: option {key}={ours[key]!r} != reference {recorded[key]!r}")
    return problems


def _input_differences(where: str, spec: Input, ours: Any, recorded: Any) -> list[str]:
    """One input's spec: hidden kind, or [type or choices, options] (missing options = {})."""
    if isinstance(recorded, str) or isinstance(ours, str):
        return [] if ours == recorded else [f"{where}: {ours!r} != reference {recorded!r}"]
    ours_options = ours[1] if len(ours) > 1 else {}
    recorded_options = recorded[1] if len(recorded) > 1 else {}
    head = recorded[0]
    if isinstance(head, list):
        if spec.type != "COMBO" or spec.combo_style != "legacy":
            return [f"{where}: reference is a legacy combo, ours is {ours[0]!r}"]
        problems = _choice_differences(where, spec, head)
        return problems + _option_differences(where, ours_options, recorded_options)
    if ours[0] != head:
        return [f"{where}: type {ours[0]!r} != reference {head!r}"]
    if head == "COMBO":
        problems = _choice_differences(where, spec, recorded_options.get("options", []))
        return problems + _option_differences(where, ours_options, recorded_options,
                                              frozenset({"options"}))
    return _option_differences(where, ours_options, recorded_options)


def schema_differences(schema: NodeSchema, recorded: dict[str, Any]) -> list[str]:
    """Every way `schema`'s /object_info entry differs from the recorded one (empty = equal)."""
    entry = object_info_entry(schema)
    problems = []
    if set(entry["input"]) != set(recorded["input"]):
        problems.append(f"input sections {sorted(entry['input'])} != {sorted(recorded['input'])}")
    if entry["input_order"] != recorded["input_order"]:
        problems.append(f"input_order {entry['input_order']} != {recorded['input_order']}")
    for section, inputs in recorded["input"].items():
        ours = entry["input"].get(section, {})
        for name, spec in inputs.items():
            if name not in ours:
                problems.append(f"{section}.{name}: missing")
                continue
            problems += _input_differences(f"{section}.{name}", schema.input(name), ours[name],
                                           spec)
    for key in PLAIN_FIELDS:
        if entry[key] != recorded[key]:
            problems.append(f"{key}: {entry[key]!r} != reference {recorded[key]!r}")
    for key, absent in OPTIONAL_FIELDS:
        if key in recorded and entry.get(key, absent) != recorded[key]:
            problems.append(f"{key}: {entry.get(key, absent)!r} != reference "
                            f"{recorded.get(key, absent)!r}")
    # A null display_name (nodes declared without one) is shown as the class name.
    expected_display = recorded["display_name"] or recorded["name"]
    if entry["display_name"] != expected_display:
        problems.append(f"display_name: {entry['display_name']!r} != {expected_display!r}")
    return problems


def assert_matches_reference(node_type: type[Node], reference: str = REFERENCE_FILE) -> None:
    """Fail with every difference between the node's schema and ComfyUI's recorded entry."""
    recorded = reference_entry(node_type.schema.name, reference)
    problems = schema_differences(node_type.schema, recorded)
    assert not problems, f"{node_type.schema.name} schema differs:\n  " + "\n  ".join(problems)
