"""progress_state messages: every change while a run is small, a linear number of node entries
however large it gets, and never a final state left unsent."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from engine.events import NodeLineage
from web.progress_state import ALLOWANCE, ENTRIES_PER_CHANGE, STALE_DELAY_S, ProgressStates


class Sink:
    """Collects the messages and timers a ProgressStates hands out."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.timers: list[Callable[[], None]] = []

    def send(self, text: str) -> None:
        self.sent.append(json.loads(text))

    def call_later(self, seconds: float, callback: Callable[[], None]) -> None:
        self.timers.append(callback)

    def entries(self) -> int:
        return sum(len(message["data"]["nodes"]) for message in self.sent)


def run_nodes(states: ProgressStates, count: int) -> None:
    for index in range(count):
        states.set(str(index), "running", 0, 1)
        states.set(str(index), "finished", 1, 1)


def test_a_small_run_sends_one_message_per_change_in_comfyuis_shape() -> None:
    sink = Sink()
    states = ProgressStates("p1", sink.send, sink.call_later)
    run_nodes(states, 3)
    assert len(sink.sent) == 6
    last = sink.sent[-1]
    assert last["type"] == "progress_state" and last["data"]["prompt_id"] == "p1"
    assert last["data"]["nodes"]["2"] == {
        "value": 1, "max": 1, "state": "finished", "node_id": "2", "prompt_id": "p1",
        "display_node_id": "2", "parent_node_id": None, "real_node_id": "2"}


def test_a_node_an_expansion_added_shows_on_its_display_node() -> None:
    sink = Sink()
    states = ProgressStates("p1", sink.send, sink.call_later)
    states.lineage["5.0.0.1"] = NodeLineage("5.0.0.1", "7", "5", "5")
    states.set("5.0.0.1", "running", 0, 1)
    entry = sink.sent[-1]["data"]["nodes"]["5.0.0.1"]
    assert (entry["display_node_id"], entry["parent_node_id"], entry["real_node_id"]) == \
        ("7", "5", "5")


def test_a_large_run_sends_a_linear_number_of_node_entries() -> None:
    sink = Sink()
    states = ProgressStates("p1", sink.send, sink.call_later)
    count = 5_000
    run_nodes(states, count)
    states.flush()
    assert sink.entries() <= ALLOWANCE + ENTRIES_PER_CHANGE * 2 * count + count


def test_the_end_of_a_run_sends_the_state_a_skipped_message_held_back() -> None:
    sink = Sink()
    states = ProgressStates("p1", sink.send, sink.call_later)
    run_nodes(states, 500)
    states.flush()
    final = sink.sent[-1]["data"]["nodes"]
    assert len(final) == 500 and all(entry["state"] == "finished" for entry in final.values())


def test_a_skipped_message_is_sent_by_the_timer_once_changes_pause(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("web.progress_state.time.monotonic", lambda: clock[0])
    sink = Sink()
    states = ProgressStates("p1", sink.send, sink.call_later)
    run_nodes(states, 500)
    states.set("500", "running", 0, 1)
    assert sink.sent[-1]["data"]["nodes"].get("500") is None
    sink.timers.pop()()  # fires while changes still come: waits longer
    assert sink.sent[-1]["data"]["nodes"].get("500") is None
    clock[0] += 2 * STALE_DELAY_S
    sink.timers.pop()()
    assert sink.sent[-1]["data"]["nodes"]["500"]["state"] == "running"


def test_a_progress_value_recorded_silently_is_sent_with_the_next_announcement() -> None:
    sink = Sink()
    states = ProgressStates("p1", sink.send, sink.call_later)
    states.set("1", "running", 0, 1)
    states.set("1", "running", 3, 20, announce=False)
    assert len(sink.sent) == 1
    states.announce()
    assert sink.sent[-1]["data"]["nodes"]["1"]["value"] == 3
    assert states.max_of("1") == 20
