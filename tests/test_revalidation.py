"""A PromptValidator remembers the last prompt: what did not change keeps its verdict, but
anything whose verdict can change without the prompt changing is checked again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.context import NodeContext, Services
from engine.node import Combo, FilesIn, Node, NodeSchema, Output
from engine.paths import Paths
from engine.registry import NodeRegistry
from engine.validation import PromptValidator
from tests.stubs import STUB_TYPES, node


class LoadPicture(Node):
    """A combo over the files of the input folder."""

    schema = NodeSchema("LoadPicture", (Combo("image", FilesIn("input")),), (Output("STRING"),))

    def execute(self, ctx: NodeContext, image: str) -> tuple[str]:
        return (image,)


class CountedCheck(Node):
    """Counts how often its own validation runs."""

    schema = NodeSchema("CountedCheck", (Combo("mode", ("a", "b"), default="a"),),
                        (Output("INT"),))
    calls = 0

    def validate(self, ctx: NodeContext, **inputs: Any) -> None:
        type(self).calls += 1

    def execute(self, ctx: NodeContext, mode: str) -> tuple[int]:
        return (0,)


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    paths = Paths.from_base(tmp_path)
    paths.input.mkdir(parents=True, exist_ok=True)
    return paths


@pytest.fixture
def validator(paths: Paths) -> PromptValidator:
    registry = NodeRegistry()
    registry.register_all([*STUB_TYPES, LoadPicture, CountedCheck])
    return PromptValidator(registry, Services(paths))


def chain(value: Any, factor: float = 1.0) -> dict[str, Any]:
    return {"1": node("Const", value=value),
            "2": node("Scale", x=["1", 0], factor=factor, mode="round"),
            "3": node("Show", x=["2", 0])}


def test_a_prompt_posted_again_validates_the_same_with_converted_values(
        validator: PromptValidator) -> None:
    first = validator.validate(chain("5"))
    again = validator.validate(chain("5"))
    assert first.ok and again.ok and again.outputs == first.outputs == ["3"]
    assert again.prompt.nodes["1"].literals == {"value": 5}
    assert again.prompt.order_for(again.outputs) == ["1", "2", "3"]


def test_a_widget_changed_out_of_range_is_reported_on_the_next_prompt(
        validator: PromptValidator) -> None:
    assert validator.validate(chain(5, factor=2.0)).ok
    result = validator.validate(chain(5, factor=20.0))
    assert result.node_errors["2"]["errors"][0]["type"] == "value_bigger_than_max"


def test_a_prompt_fixed_after_an_error_passes(validator: PromptValidator) -> None:
    assert not validator.validate(chain(5000)).ok
    assert validator.validate(chain(5)).ok


def test_a_file_combo_is_checked_again_when_the_prompt_is_unchanged(
        validator: PromptValidator, paths: Paths) -> None:
    picture = paths.input / "cat.png"
    picture.write_bytes(b"not really a png")
    prompt = {"1": node("LoadPicture", image="cat.png"), "2": node("Show", x=["1", 0])}
    assert validator.validate(prompt).ok
    picture.unlink()
    result = validator.validate(prompt)
    assert result.node_errors["1"]["errors"][0]["type"] == "value_not_in_list"


def test_a_nodes_own_validation_runs_for_every_prompt(validator: PromptValidator) -> None:
    prompt = {"1": node("CountedCheck", mode="a"), "2": node("Show", x=["1", 0])}
    CountedCheck.calls = 0
    validator.validate(prompt)
    validator.validate(prompt)
    assert CountedCheck.calls == 2


def test_a_link_is_checked_again_when_its_source_changes_class(
        validator: PromptValidator) -> None:
    assert validator.validate(chain(5)).ok
    changed = chain(5)
    changed["1"] = node("Text", text="five")
    result = validator.validate(changed)
    assert result.node_errors["2"]["errors"][0]["type"] == "return_type_mismatch"


def test_a_new_link_that_closes_a_cycle_is_reported(validator: PromptValidator) -> None:
    prompt = {"1": node("Const", value=1), "2": node("Add", a=["1", 0], b=["1", 0]),
              "3": node("Add", a=["2", 0], b=["2", 0]), "4": node("Show", x=["3", 0])}
    assert validator.validate(prompt).ok
    prompt["2"] = node("Add", a=["1", 0], b=["3", 0])
    result = validator.validate(prompt)
    assert result.node_errors["2"]["errors"][0]["type"] == "dependency_cycle"


def test_an_unknown_node_added_later_is_reported(validator: PromptValidator) -> None:
    assert validator.validate(chain(5)).ok
    grown = {**chain(5), "4": node("Missing"), "5": node("Show", x=["4", 0])}
    result = validator.validate(grown)
    assert result.node_errors["4"]["errors"][0]["type"] == "missing_node_type"


def test_a_failing_prompt_posted_again_fails_again(validator: PromptValidator) -> None:
    first = validator.validate(chain(5000))
    again = validator.validate(chain(5000))
    assert not again.ok and again.node_errors == first.node_errors
