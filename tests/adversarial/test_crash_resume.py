"""Crash recovery of a partly finished prompt: killed (kill -9) after one of its output nodes
saved a file, it resumes after the restart keeping (and reporting) that file instead of writing
it again, so the history names the file the client was first told about."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.events import RecordingListener
from engine.graph import Prompt
from tests.stubs import Engine, node
from tests.web.conftest import start_server
from tests.web.prompt_helpers import base_with_test_pack, submit, wait_history, ws_url
from tests.web.wsclient import EventRecorder, is_json
from web.history import History, HistoryRecord
from web.queue import PromptQueue, QueueItem
from web.resume import Resume
from web.store import Store

CLIENT = "resume-client"


def early_and_slow() -> dict[str, Any]:
    """SaveImage "early" (runs first), then a slow chain ending in a second output node."""
    return {"1": {"class_type": "EmptyImage",
                  "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                        "filename_prefix": "early"}},
            "3": {"class_type": "LoomTestValue", "inputs": {"value": 7}},
            "4": {"class_type": "LoomTestSlow", "inputs": {"value": ["3", 0], "steps": 40,
                                                           "delay": 0.05}},
            "5": {"class_type": "LoomTestShow", "inputs": {"value": ["4", 0],
                                                           "label": "slow"}}}


def test_a_killed_prompt_keeps_the_outputs_it_saved(tmp_path: Path) -> None:
    base = base_with_test_pack(tmp_path / "base")
    first = start_server(base)
    try:
        with EventRecorder(f"{ws_url(first)}?clientId={CLIENT}") as recorder:
            prompt_id = submit(first, early_and_slow(), client_id=CLIENT)["prompt_id"]
            told = recorder.wait_for(lambda m: is_json(m, "executed")
                                     and m["data"]["node"] == "2")["data"]["output"]
            recorder.wait_for(lambda m: is_json(m, "progress") and m["data"]["node"] == "4")
    finally:
        first.stop(kill=True)
    assert told["images"][0]["filename"] == "early_00001_.png"

    second = start_server(base)
    try:
        entry = wait_history(second, prompt_id)
    finally:
        second.stop()
    assert entry["status"]["status_str"] == "success"
    assert entry["outputs"]["2"] == told and entry["outputs"]["5"] == {"text": ["slow=7"]}
    assert sorted(p.name for p in (base / "output").iterdir()) == ["early_00001_.png"]
    assert "keeping the saved output of node(s) 2" in second.log()
    assert "Traceback" not in second.log(), second.log()


# -- the journal, in process ---------------------------------------------------------------------

KEPT = {"text": ["kept"]}


@pytest.fixture
def queue(tmp_path: Path) -> PromptQueue:
    store = Store(tmp_path / "loom.db")
    return PromptQueue(store, History(store))


def two_outputs(engine: Engine) -> tuple[Prompt, list[str]]:
    checked = engine.validate({"1": node("Const", value=1), "2": node("Show", x=["1", 0]),
                               "3": node("Const", value=3), "4": node("Show", x=["3", 0])})
    return checked.prompt, checked.outputs


def test_a_resumed_run_reports_its_kept_output_and_runs_only_the_rest(
        tmp_path: Path, queue: PromptQueue) -> None:
    engine = Engine(tmp_path)
    prompt, outputs = two_outputs(engine)
    queue.journal_output("p", "2", KEPT)
    resume = Resume(queue, "p")
    listener = RecordingListener()
    result = resume.merge(engine.executor.execute(prompt, resume.targets(prompt, outputs),
                                                  prompt_id="p",
                                                  listener=resume.listener(listener)))
    assert listener.executed_nodes() == ["3", "4"]
    assert listener.names()[:3] == ["execution_start", "execution_cached", "executed"]
    assert listener.events[2][1]["node"] == "2" and listener.events[2][1]["output"] == KEPT
    assert result.outputs["2"] == KEPT and "4" in result.outputs
    assert set(queue.journaled_outputs("p")) == {"2", "4"}


def test_each_saved_output_is_journaled_as_it_happens(tmp_path: Path,
                                                      queue: PromptQueue) -> None:
    engine = Engine(tmp_path)
    prompt, outputs = two_outputs(engine)
    resume = Resume(queue, "p")
    engine.executor.execute(prompt, resume.targets(prompt, outputs), prompt_id="p",
                            listener=resume.listener(RecordingListener()))
    assert list(queue.journaled_outputs("p")) == ["2", "4"]


def test_finishing_or_deleting_a_prompt_clears_its_journal(queue: PromptQueue) -> None:
    for prompt_id in ("done", "dropped"):
        queue.put(QueueItem(0, prompt_id, {}, {}, []))
        queue.journal_output(prompt_id, "2", KEPT)
    queue.take(timeout=0)
    queue.finish("done", HistoryRecord.build([0, "done", {}, {}, []], {}, "success", [], {}))
    queue.delete(["dropped"])
    assert queue.journaled_outputs("done") == {} == queue.journaled_outputs("dropped")
