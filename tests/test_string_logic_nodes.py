"""Text nodes follow Python's string semantics as ComfyUI's do; the Switch evaluates only the
chosen branch; Custom Combo accepts whatever the editor lists; Preview as Text shows any value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine.context import NodeContext
from nodes.logic import ComfySwitchNode, CustomCombo, PreviewAny
from nodes.strings import (
    CaseConverter,
    RegexExtract,
    RegexMatch,
    RegexReplace,
    StringCompare,
    StringConcatenate,
    StringContains,
    StringLength,
    StringReplace,
    StringSubstring,
    StringTrim,
)
from tests.node_testing import run_node, run_ui
from tests.stubs import Engine, node


def one(node_type: type, ctx: NodeContext, **inputs: Any) -> Any:
    (value,) = run_node(node_type, ctx, **inputs)
    return value


def test_concatenate_with_delimiter(ctx: NodeContext) -> None:
    assert one(StringConcatenate, ctx, string_a="a", string_b="b", delimiter=", ") == "a, b"


@pytest.mark.parametrize(("start", "end", "expected"), [(1, 3, "bc"), (-2, 10, "de")])
def test_substring_slices(ctx: NodeContext, start: int, end: int, expected: str) -> None:
    assert one(StringSubstring, ctx, string="abcde", start=start, end=end) == expected


def test_length(ctx: NodeContext) -> None:
    assert one(StringLength, ctx, string="héllo") == 5


@pytest.mark.parametrize(("mode", "expected"), [
    ("UPPERCASE", "HELLO WORLD"), ("lowercase", "hello world"),
    ("Capitalize", "Hello world"), ("Title Case", "Hello World")])
def test_case_converter(ctx: NodeContext, mode: str, expected: str) -> None:
    assert one(CaseConverter, ctx, string="hELLO wORLD", mode=mode) == expected


@pytest.mark.parametrize(("mode", "expected"), [("Both", "x"), ("Left", "x \n"),
                                                ("Right", "  x")])
def test_trim(ctx: NodeContext, mode: str, expected: str) -> None:
    assert one(StringTrim, ctx, string="  x \n", mode=mode) == expected


def test_replace_every_occurrence(ctx: NodeContext) -> None:
    assert one(StringReplace, ctx, string="a-b-c", find="-", replace="+") == "a+b+c"


@pytest.mark.parametrize(("case_sensitive", "expected"), [(True, False), (False, True)])
def test_contains(ctx: NodeContext, case_sensitive: bool, expected: bool) -> None:
    assert one(StringContains, ctx, string="Hello", substring="hell",
               case_sensitive=case_sensitive) is expected


@pytest.mark.parametrize(("mode", "expected"), [("Starts With", True), ("Ends With", False),
                                                ("Equal", False)])
def test_compare(ctx: NodeContext, mode: str, expected: bool) -> None:
    assert one(StringCompare, ctx, string_a="Prefix-body", string_b="prefix", mode=mode,
               case_sensitive=False) is expected


def test_regex_match_honours_the_flags(ctx: NodeContext) -> None:
    flags = {"case_insensitive": False, "multiline": True, "dotall": False}
    assert one(RegexMatch, ctx, string="a\nB", regex_pattern="^B$", **flags) is True
    assert one(RegexMatch, ctx, string="a\nb", regex_pattern="^B$", **flags) is False


def test_regex_match_of_an_invalid_pattern_is_false(ctx: NodeContext) -> None:
    assert one(RegexMatch, ctx, string="a", regex_pattern="(", case_insensitive=True,
               multiline=False, dotall=False) is False


@pytest.mark.parametrize(("mode", "expected"), [
    ("First Match", "a1"), ("All Matches", "a\nb"), ("First Group", "1"),
    ("All Groups", "1\n2")])
def test_regex_extract_modes(ctx: NodeContext, mode: str, expected: str) -> None:
    assert one(RegexExtract, ctx, string="a1 b2", regex_pattern=r"([a-z])(\d)", mode=mode,
               case_insensitive=True, multiline=False, dotall=False,
               group_index=2 if "Group" in mode else 1) == expected


def test_regex_replace_counts_and_uses_groups(ctx: NodeContext) -> None:
    assert one(RegexReplace, ctx, string="a1 b2 c3", regex_pattern=r"(\w)(\d)",
               replace=r"\2\1", count=2) == "1a 2b c3"


def test_regex_replace_with_a_bad_pattern_names_it(ctx: NodeContext) -> None:
    with pytest.raises(ValueError, match="'\\('"):
        run_node(RegexReplace, ctx, string="a", regex_pattern="(", replace="")


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = Engine(tmp_path)
    engine.registry.register_all((ComfySwitchNode, PreviewAny))
    return engine


@pytest.mark.parametrize(("switch", "expected"), [(True, "7"), (False, "3")])
def test_switch_runs_only_the_chosen_branch(engine: Engine, switch: bool,
                                            expected: str) -> None:
    api = {"1": node("Const", value=7), "2": node("Const", value=3),
           "3": node("Fail", x=["2", 0]) if switch else node("Fail", x=["1", 0]),
           "4": node("ComfySwitchNode", switch=switch,
                     on_true=["1", 0] if switch else ["3", 0],
                     on_false=["3", 0] if switch else ["2", 0]),
           "5": node("PreviewAny", source=["4", 0])}
    result, _ = engine.run(api)
    assert result.status == "success", result.error
    assert result.outputs["5"]["text"] == [expected]
    assert "3" not in result.executed


def test_custom_combo_accepts_a_choice_only_the_editor_lists(engine: Engine) -> None:
    engine.registry.register(CustomCombo)
    result = engine.validate({"1": node("CustomCombo", choice="my option"),
                              "2": node("Show", x=["1", 0])})
    assert result.node_errors == {}


@pytest.mark.parametrize(("value", "text"), [
    ("plain", "plain"), (3, "3"), (None, "None"), ({"a": [1, 2]}, '{\n    "a": [\n        1,'),
    (torch.zeros(2), "tensor([0., 0.])")])
def test_preview_any_shows_the_value_as_text(ctx: NodeContext, value: Any, text: str) -> None:
    assert run_ui(PreviewAny, ctx, source=value)["text"][0].startswith(text)
