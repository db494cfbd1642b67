"""Sweep expansion: the grammar of --sweep values, grids and zips, naming outputs by their
overrides, and POST /prompt's loom_sweep shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.sweep import (
    MAX_SWEEP_PROMPTS,
    SweepError,
    combinations,
    expand,
    label_for,
    parse_axis,
    rows_from_request,
)


def workflow() -> dict[str, Any]:
    return {"3": {"class_type": "KSampler", "inputs": {"seed": 0, "cfg": 7.0}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat"}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "run/img",
                                                         "images": ["8", 0]}}}


def test_an_integer_range_includes_both_ends() -> None:
    assert parse_axis("3.seed=1..4").values == (1, 2, 3, 4)


def test_a_range_takes_a_step_and_can_count_down() -> None:
    assert parse_axis("3.seed=0..10:5").values == (0, 5, 10)
    assert parse_axis("3.seed=3..1").values == (3, 2, 1)


def test_a_range_that_never_reaches_its_end_is_refused() -> None:
    with pytest.raises(SweepError, match="never reaches"):
        parse_axis("3.seed=1..5:-1")


def test_a_json_list_gives_its_values() -> None:
    assert parse_axis("3.cfg=[5, 7.5, 9]").values == (5, 7.5, 9)


def test_a_file_gives_one_value_per_non_empty_line(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\na blue bird\n42\n")
    assert parse_axis(f"6.text=@{prompts}").values == ("a red fox", "a blue bird", 42)


def test_a_missing_file_names_the_axis_and_the_path(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match=r"--sweep 6\.text: cannot read .*nope\.txt"):
        parse_axis(f"6.text=@{tmp_path / 'nope.txt'}")


def test_a_sweep_without_a_target_says_the_expected_form() -> None:
    with pytest.raises(SweepError, match="NODE_ID.INPUT=SPEC"):
        parse_axis("1..4")


def test_a_grid_varies_the_last_axis_fastest() -> None:
    axes = [parse_axis("3.seed=1..2"), parse_axis('6.text=["a", "b"]')]
    assert combinations(axes, zipped=False) == [
        {"3.seed": 1, "6.text": "a"}, {"3.seed": 1, "6.text": "b"},
        {"3.seed": 2, "6.text": "a"}, {"3.seed": 2, "6.text": "b"}]


def test_zipped_axes_pair_their_values() -> None:
    axes = [parse_axis("3.seed=1..2"), parse_axis('6.text=["a", "b"]')]
    assert combinations(axes, zipped=True) == [{"3.seed": 1, "6.text": "a"},
                                               {"3.seed": 2, "6.text": "b"}]


def test_zipped_axes_of_different_lengths_are_refused() -> None:
    with pytest.raises(SweepError, match="equal lengths"):
        combinations([parse_axis("3.seed=1..3"), parse_axis("3.cfg=[1, 2]")], zipped=True)


def test_a_grid_over_the_prompt_limit_is_refused_before_expanding() -> None:
    with pytest.raises(SweepError, match=str(MAX_SWEEP_PROMPTS)):
        combinations([parse_axis("3.seed=1..1000"), parse_axis("3.cfg=1..1000")],
                      zipped=False)


def test_each_expanded_prompt_carries_its_overrides() -> None:
    items = expand(workflow(), [{"3.seed": 5, "6.text": "a dog"}])
    assert items[0].prompt["3"]["inputs"]["seed"] == 5
    assert items[0].prompt["6"]["inputs"]["text"] == "a dog"


def test_outputs_are_named_by_their_overrides() -> None:
    items = expand(workflow(), [{"3.seed": 5, "6.text": "a red fox"}])
    assert items[0].label == "3.seed=5_6.text=a-red-fox"
    assert items[0].prompt["9"]["inputs"]["filename_prefix"] == "run/img_3.seed=5_6.text=a-red-fox"


def test_expansion_leaves_the_original_workflow_alone() -> None:
    original = workflow()
    expand(original, [{"3.seed": 5}])
    assert original["3"]["inputs"]["seed"] == 0
    assert original["9"]["inputs"]["filename_prefix"] == "run/img"


def test_a_label_keeps_file_names_safe() -> None:
    assert label_for({"6.text": "a/b\\c: d?"}) == "6.text=a-b-c-d"
    assert len(label_for({"6.text": "x" * 500})) < 60


def test_a_sweep_of_a_node_the_workflow_lacks_names_its_nodes() -> None:
    with pytest.raises(SweepError, match=r"no node '7' \(its nodes: 3, 6, 9\)"):
        expand(workflow(), [{"7.seed": 1}])


def test_request_grid_takes_lists_and_ranges() -> None:
    rows = rows_from_request({"grid": {"3.seed": "1..2", "6.text": ["a", "b"]}})
    assert len(rows) == 4 and rows[0] == {"3.seed": 1, "6.text": "a"}


def test_request_list_gives_one_prompt_per_entry() -> None:
    rows = rows_from_request({"list": [{"3.seed": 1}, {"3.seed": 9, "6.text": "x"}]})
    assert rows == [{"3.seed": 1}, {"3.seed": 9, "6.text": "x"}]


@pytest.mark.parametrize("bad", [{"grid": {"3.seed": "@/etc/passwd"}}, {"grid": {}},
                                 {"cube": {"3.seed": [1]}}, {"list": []}, [1, 2]])
def test_request_sweeps_of_other_shapes_are_refused(bad: Any) -> None:
    with pytest.raises(SweepError):
        rows_from_request(bad)
