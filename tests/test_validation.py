"""Validation reports every problem at once, in ComfyUI's error shape."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.validation import validate_prompt
from tests.stubs import Engine, node


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return Engine(tmp_path)


def errors_of(result, node_id: str) -> list[dict]:
    return result.node_errors[node_id]["errors"]


def test_valid_prompt_has_no_errors_and_lists_its_outputs(engine: Engine) -> None:
    result = engine.validate({"1": node("Const", value=2), "2": node("Show", x=["1", 0])})
    assert result.error is None and result.node_errors == {}
    assert result.outputs == ["2"]


def test_unknown_class_type_is_named_with_closest_match(engine: Engine) -> None:
    result = engine.validate({"1": node("Cosnt", value=2), "2": node("Show", x=["1", 0])})
    assert result.error["type"] == "invalid_prompt"
    assert result.error["message"] == "Cannot execute because node Cosnt does not exist."
    assert result.error["details"] == "Node ID '#1'"
    entry = errors_of(result, "1")[0]
    assert entry["type"] == "missing_node_type"
    assert entry["extra_info"]["closest"] == ["Const"]


def test_node_without_class_type_is_reported(engine: Engine) -> None:
    result = engine.validate({"1": {"inputs": {}}, "2": node("Show", x=["1", 0])})
    assert "missing the class_type" in result.error["message"]


def test_missing_required_input(engine: Engine) -> None:
    result = engine.validate({"1": node("Const", value=1), "2": node("Add", a=["1", 0]),
                              "3": node("Show", x=["2", 0])})
    assert result.error["type"] == "prompt_outputs_failed_validation"
    entry = errors_of(result, "2")[0]
    assert entry["type"] == "required_input_missing"
    assert entry["extra_info"]["input_name"] == "b"
    assert result.node_errors["2"]["dependent_outputs"] == ["3"]
    assert result.node_errors["2"]["class_type"] == "Add"


def test_link_to_missing_node(engine: Engine) -> None:
    result = engine.validate({"2": node("Show", x=["9", 0])})
    entry = errors_of(result, "2")[0]
    assert entry["type"] == "exception_during_validation"
    assert "'9'" in entry["details"] and "does not exist" in entry["details"]


def test_link_to_missing_output_slot(engine: Engine) -> None:
    result = engine.validate({"1": node("Const", value=1), "2": node("Show", x=["1", 3])})
    entry = errors_of(result, "2")[0]
    assert entry["type"] == "exception_during_validation"
    assert "output 3" in entry["details"] and "1 output(s)" in entry["details"]


def test_type_mismatch_across_a_link_names_both_types(engine: Engine) -> None:
    result = engine.validate({"1": node("Text", text="x"), "2": node("Const", value=1),
                              "3": node("Add", a=["1", 0], b=["2", 0]),
                              "4": node("Show", x=["3", 0])})
    entry = errors_of(result, "3")[0]
    assert entry["type"] == "return_type_mismatch"
    assert entry["details"] == "a, received_type(STRING) mismatch input_type(INT)"
    assert entry["extra_info"]["received_type"] == "STRING"
    assert entry["extra_info"]["linked_node"] == ["1", 0]


def test_value_above_max_and_below_min(engine: Engine) -> None:
    high = engine.validate({"1": node("Const", value=5000), "2": node("Show", x=["1", 0])})
    entry = errors_of(high, "1")[0]
    assert entry["type"] == "value_bigger_than_max"
    assert entry["message"] == "Value 5000 bigger than max of 1000"
    assert entry["extra_info"]["received_value"] == 5000
    assert entry["extra_info"]["input_config"][0] == "INT"
    low = engine.validate({"1": node("Const", value=-5000), "2": node("Show", x=["1", 0])})
    assert errors_of(low, "1")[0]["message"] == "Value -5000 smaller than min of -1000"


def test_unconvertible_value(engine: Engine) -> None:
    result = engine.validate({"1": node("Const", value="abc"), "2": node("Show", x=["1", 0])})
    entry = errors_of(result, "1")[0]
    assert entry["type"] == "invalid_input_type"
    assert entry["message"] == "Failed to convert an input value to a INT value"
    assert "invalid literal for int()" in entry["details"]


def test_numeric_strings_are_converted(engine: Engine) -> None:
    result = engine.validate({"1": node("Const", value="7"), "2": node("Show", x=["1", 0])})
    assert result.node_errors == {}
    assert result.prompt.nodes["1"].literals["value"] == 7


def test_combo_value_not_in_list_suggests_closest(engine: Engine) -> None:
    result = engine.validate({"1": node("Const", value=1),
                              "2": node("Scale", x=["1", 0], factor=1.0, mode="rond"),
                              "3": node("Show", x=["2", 0])})
    entry = errors_of(result, "2")[0]
    assert entry["type"] == "value_not_in_list"
    assert entry["details"].startswith("mode: 'rond' not in ['round', 'floor']")
    assert entry["extra_info"]["closest"][0] == "round"


def test_cycle_is_reported_with_its_path(engine: Engine) -> None:
    result = engine.validate({"1": node("Add", a=["2", 0], b=["2", 0]),
                              "2": node("Parity", x=["1", 0]), "3": node("Show", x=["2", 0])})
    entry = errors_of(result, "1")[0]
    assert entry["type"] == "dependency_cycle"
    cycle = entry["extra_info"]["cycle"]
    assert cycle[0] == cycle[-1] and set(cycle) == {"1", "2"}
    assert " -> " in entry["details"]


def test_no_output_node(engine: Engine) -> None:
    result = engine.validate({"1": node("Const", value=1)})
    assert result.error["type"] == "prompt_no_outputs"
    assert result.error["message"] == "Prompt has no outputs"


def test_all_problems_are_reported_at_once(engine: Engine) -> None:
    result = engine.validate({"1": node("Const", value=5000), "2": node("Add", a=["1", 0]),
                              "3": node("Show", x=["2", 0]), "4": node("Text", text="x"),
                              "5": node("Add", a=["4", 0], b=["1", 0]),
                              "6": node("Show", x=["5", 0])})
    assert set(result.node_errors) == {"1", "2", "5"}
    assert sorted(result.node_errors["1"]["dependent_outputs"]) == ["3", "6"]
    assert result.outputs == []


def test_valid_outputs_run_when_others_fail(engine: Engine) -> None:
    result = engine.validate({"1": node("Const", value=1), "2": node("Show", x=["1", 0]),
                              "3": node("Const", value=5000), "4": node("Show", x=["3", 0])})
    assert result.error is None
    assert result.outputs == ["2"]
    assert set(result.node_errors) == {"3"}


def test_custom_validation_failure(engine: Engine) -> None:
    result = engine.validate({"1": node("Even", value=3), "2": node("Show", x=["1", 0])})
    entry = errors_of(result, "1")[0]
    assert entry["type"] == "custom_validation_failed"
    assert entry["message"] == "Custom validation failed for node"
    assert entry["details"] == "value - 3 is odd"
    assert entry["extra_info"]["input_name"] == "value"


def test_unreached_nodes_are_not_validated(engine: Engine) -> None:
    result = engine.validate({"1": node("Const", value=1), "2": node("Show", x=["1", 0]),
                              "3": node("Const", value=99999)})
    assert result.node_errors == {}


def test_targets_limit_the_outputs(engine: Engine) -> None:
    api = {"1": node("Const", value=1), "2": node("Show", x=["1", 0]),
           "3": node("Show", x=["1", 0])}
    result = validate_prompt(api, engine.registry, engine.services, targets=["3"])
    assert result.outputs == ["3"]
