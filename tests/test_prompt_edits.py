"""Validation tells the executor what changed since the prompt before (PromptEdit): the nodes
downstream of no change keep their recorded keys without being looked at one by one, while
fingerprints are still asked and anything downstream of a change runs again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.events import RecordingListener
from engine.executor import ExecutionResult, _PromptRun
from engine.validation import PromptValidator
from tests.stubs import Engine, node


class Editor:
    """The server's side of an editor session: one remembering validator, one executor."""

    def __init__(self, tmp_path: Path) -> None:
        self.engine = Engine(tmp_path)
        self.validator = PromptValidator(self.engine.registry, self.engine.services)

    def validate(self, api: dict[str, Any]) -> Any:
        checked = self.validator.validate(api)
        assert checked.ok and not checked.node_errors, checked.to_json()
        return checked

    def run(self, api: dict[str, Any]) -> tuple[ExecutionResult, RecordingListener]:
        return self.execute(self.validate(api))

    def execute(self, checked: Any) -> tuple[ExecutionResult, RecordingListener]:
        listener = RecordingListener()
        result = self.engine.executor.execute(checked.prompt, checked.outputs, listener=listener)
        return result, listener


@pytest.fixture
def editor(tmp_path: Path) -> Editor:
    return Editor(tmp_path)


def diamond(a: int = 1, factor: float = 2.0, stamped: bool = False) -> dict[str, Any]:
    """1,2 consts -> 3 add -> 4 scale -> 5 show; 2 -> 6 show (1 fingerprinted if `stamped`)."""
    first = node("Stamped", value=a) if stamped else node("Const", value=a)
    return {"1": first, "2": node("Const", value=2),
            "3": node("Add", a=["1", 0], b=["2", 0]),
            "4": node("Scale", x=["3", 0], factor=factor, mode="round"),
            "5": node("Show", x=["4", 0]), "6": node("Show", x=["2", 0])}


def count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[str]:
    """The node ids `_PromptRun.<name>` is called with from now on."""
    calls: list[str] = []
    original = getattr(_PromptRun, name)

    def counted(run: _PromptRun, node_id: str, *rest: Any) -> Any:
        calls.append(node_id)
        return original(run, node_id, *rest)

    monkeypatch.setattr(f"engine.executor._PromptRun.{name}", counted)
    return calls


def test_validation_names_the_nodes_whose_body_changed(editor: Editor) -> None:
    first = editor.validate(diamond(factor=2.0))
    second = editor.validate(diamond(factor=3.0))
    assert first.prompt.edit is None
    assert second.prompt.edit is not None
    assert second.prompt.edit.before is first.prompt.nodes
    assert second.prompt.edit.changed == {"4"}


def test_the_same_prompt_again_is_an_edit_that_changed_nothing(editor: Editor) -> None:
    first = editor.validate(diamond())
    again = editor.validate(diamond())
    assert again.prompt.edit is not None and again.prompt.edit.changed == frozenset()
    assert again.prompt.edit.before is first.prompt.nodes


def test_a_widget_changed_at_an_output_looks_at_that_node_alone(
        editor: Editor, monkeypatch: pytest.MonkeyPatch) -> None:
    editor.run(diamond())
    looked_at = count_calls(monkeypatch, "facts")
    result, events = editor.run({**diamond(), "5": node("Show", x=["4", 0], label="new")})
    assert result.ok and events.executed_nodes() == ["5"]
    assert sorted(result.cached) == ["1", "2", "3", "4", "6"]
    assert set(looked_at) == {"5"}


def test_a_widget_changed_mid_graph_reruns_exactly_its_descendants(
        editor: Editor, monkeypatch: pytest.MonkeyPatch) -> None:
    editor.run(diamond(factor=2.0))
    keyed = count_calls(monkeypatch, "_key")
    result, events = editor.run(diamond(factor=3.0))
    assert events.executed_nodes() == ["4", "5"] and sorted(keyed) == ["4", "5"]
    assert result.outputs == {"5": {"text": ["9.0"]}, "6": {"text": ["2"]}}


def test_the_cached_outputs_are_shown_again(editor: Editor) -> None:
    editor.run(diamond(factor=2.0))
    result, events = editor.run(diamond(factor=3.0))
    assert [data["node"] for name, data in events.events if name == "executed"] == ["6", "5"]
    assert events.events[1] == ("execution_cached", {
        "nodes": ["1", "2", "3", "6"], "prompt_id": result.prompt_id,
        "timestamp": events.events[1][1]["timestamp"]})


def test_an_unchanged_node_whose_fingerprint_changed_reruns_with_its_descendants(
        editor: Editor) -> None:
    editor.run(diamond(stamped=True))
    editor.engine.services.paths.input.mkdir(parents=True, exist_ok=True)
    (editor.engine.services.paths.input / "stamp.txt").write_text("5")  # changed on disk
    result, events = editor.run({**diamond(stamped=True), "6": node("Show", x=["2", 0],
                                                                      label="new")})
    assert sorted(events.executed_nodes()) == ["1", "3", "4", "5", "6"]
    assert result.outputs["5"] == {"text": ["16.0"]}


def test_an_edit_of_a_prompt_that_never_ran_is_not_trusted(editor: Editor) -> None:
    editor.run(diamond(a=1, factor=2.0))
    editor.validate(diamond(a=1, factor=3.0))  # validated, never run (say, deleted from the queue)
    result, events = editor.execute(editor.validate(diamond(a=4, factor=3.0)))
    assert result.outputs["5"] == {"text": ["18.0"]}
    assert events.executed_nodes() == ["1", "3", "4", "5"]


def test_a_node_that_joins_the_run_unchanged_is_computed(editor: Editor) -> None:
    editor.run({**diamond(), "7": node("Const", value=9)})  # 7 feeds nothing: not run
    result, events = editor.run({**diamond(), "7": node("Const", value=9),
                                 "6": node("Show", x=["7", 0])})
    assert result.outputs["6"] == {"text": ["9"]}
    assert events.executed_nodes() == ["7", "6"]


def test_a_kept_entry_missing_from_the_cache_falls_back_to_looking_up_every_node(
        editor: Editor) -> None:
    editor.run(diamond(factor=2.0))
    editor.engine.executor.cache.clear()
    result, events = editor.run(diamond(factor=3.0))
    assert sorted(events.executed_nodes()) == ["1", "2", "3", "4", "5", "6"]
    assert result.outputs["5"] == {"text": ["9.0"]}


def test_a_replayed_run_is_recorded_as_the_run_of_the_prompt_it_replayed(editor: Editor) -> None:
    editor.run(diamond())
    editor.run(diamond())  # replayed
    third = editor.validate(diamond())
    editor.execute(third)
    assert editor.engine.executor._last_run is not None
    assert editor.engine.executor._last_run.nodes is third.prompt.nodes  # the next edit's base
