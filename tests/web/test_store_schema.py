"""The queue database's schema 2: a prompt's graph stored once for every queue and history row
that holds it, databases of schema 1 upgraded on open with every row kept, and a graph deleted
with the last row that held it."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.recorded import data_path
from tests.web.test_queue_store import item, open_queue
from web.history import History, HistoryRecord
from web.queue import PromptQueue, QueueItem
from web.store import SCHEMA_VERSION, PromptText, Store

SCHEMA_1_IDS = {"queue": ["cut-off", "pending-a", "pending-b"],
                "history": ["done-ok", "done-failed"]}


@pytest.fixture
def schema_1_copy(tmp_path: Path) -> Path:
    """A copy of a database written by Loom's schema-1 queue and history code."""
    path = tmp_path / "loom.db"
    shutil.copyfile(data_path("store/loom_schema1.db"), path)
    return path


def raw_rows(path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


def stored_prompts(store: Store) -> int:
    return store.rows("SELECT COUNT(*) FROM prompts")[0][0]


def finished(queue: PromptQueue, queued: QueueItem) -> None:
    queue.put(queued)
    taken = queue.take(timeout=0)
    assert taken is not None
    queue.finish(taken.prompt_id, HistoryRecord.build(taken.to_json(), {}, "success", [], {},
                                                      taken.parts()))


def test_a_schema_1_database_is_upgraded_on_open(schema_1_copy: Path) -> None:
    _, _, store = open_queue(schema_1_copy)
    store.close()
    assert raw_rows(schema_1_copy, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert SCHEMA_VERSION == 2


def test_a_schema_1_database_keeps_every_queued_prompt(schema_1_copy: Path) -> None:
    before = dict(raw_rows(schema_1_copy, "SELECT prompt_id, item FROM queue"))
    queue, _, _ = open_queue(schema_1_copy)
    # the prompt that was running when the process stopped runs first
    assert [i.prompt_id for i in queue.pending()] == SCHEMA_1_IDS["queue"]
    assert queue.journaled_outputs("cut-off") == {"2": {"images": [
        {"filename": "Loom_00002_.png", "subfolder": "", "type": "output"}]}}
    taken = [queue.take(timeout=0) for _ in SCHEMA_1_IDS["queue"]]
    assert {i.prompt_id: i.text for i in taken if i is not None} == before
    assert taken[2] is not None and taken[2].extra_data["extra_pnginfo"] == {
        "workflow": {"nodes": []}}
    assert queue.next_number() == 5


def test_a_schema_1_database_keeps_every_history_entry(schema_1_copy: Path) -> None:
    before = dict(raw_rows(schema_1_copy, "SELECT prompt_id, entry FROM history"))
    _, history, _ = open_queue(schema_1_copy)
    assert {i: history.entry_text(i) for i in SCHEMA_1_IDS["history"]} == before
    assert [[i for i, _ in page] for page in history.pages()] == [SCHEMA_1_IDS["history"]]
    jobs, total = history.jobs({"completed", "failed"}, None, "created_at", False, None)
    assert total == 2 and [job["id"] for job in jobs] == SCHEMA_1_IDS["history"]


def test_rows_of_schema_1_and_schema_2_live_side_by_side(schema_1_copy: Path) -> None:
    queue, history, store = open_queue(schema_1_copy)
    cut_off = queue.take(timeout=0)  # queued by schema 1, finished by schema 2
    assert cut_off is not None and cut_off.prompt_id == "cut-off"
    queue.finish("cut-off", HistoryRecord.build(cut_off.to_json(), {}, "success", [], {},
                                                cut_off.parts()))
    assert queue.delete(["pending-a"]) == ["pending-a"]
    history.delete(["done-ok"])
    assert [i.prompt_id for i in queue.pending()] == ["pending-b"]
    assert [[i for i, _ in page] for page in history.pages()] == [["done-failed", "cut-off"]]
    assert history.entry("cut-off")["prompt"] == cut_off.to_json()
    assert stored_prompts(store) == 1
    history.clear()
    assert stored_prompts(store) == 0


def test_the_same_prompt_queued_again_is_stored_once(tmp_path: Path) -> None:
    queue, history, store = open_queue(tmp_path / "loom.db")
    prompt = PromptText.of('{"1": {"class_type": "X", "inputs": {}}}')
    for number, prompt_id in ((0, "a"), (1, "b"), (2, "c")):
        queued = item(number, prompt_id)
        queued.prompt_text = prompt
        finished(queue, queued) if prompt_id != "c" else queue.put(queued)
    assert stored_prompts(store) == 1
    assert history.entry("b")["prompt"] == item(1, "b").to_json()
    assert queue.pending()[0].to_json() == item(2, "c").to_json()


def test_a_prompt_is_deleted_with_the_last_row_that_holds_it(tmp_path: Path) -> None:
    queue, history, store = open_queue(tmp_path / "loom.db")
    finished(queue, item(0, "done"))
    queue.put(item(1, "waiting"))  # the same graph
    history.delete(["done"])
    assert stored_prompts(store) == 1
    queue.delete(["waiting"])
    assert stored_prompts(store) == 0


def test_clearing_the_queue_and_the_history_deletes_their_prompts(tmp_path: Path) -> None:
    queue, history, store = open_queue(tmp_path / "loom.db")
    finished(queue, item(0, "done"))
    other = QueueItem(1, "waiting", {"2": {"class_type": "Y", "inputs": {}}}, {}, ["2"])
    queue.put(other)
    assert stored_prompts(store) == 2
    queue.clear()
    history.clear()
    assert stored_prompts(store) == 0


def test_history_trimmed_to_its_bound_deletes_the_prompts_of_the_dropped_entries(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "loom.db")
    history = History(store, max_items=2)
    for index in range(4):
        graph = {str(index): {"class_type": "X", "inputs": {}}}
        history.add(HistoryRecord.build([index, f"p{index}", graph, {}, []], {}, "success",
                                        [], {}))
    assert stored_prompts(store) == 2
    assert history.entry("p3")["prompt"][2] == {"3": {"class_type": "X", "inputs": {}}}


def test_a_history_entry_stored_again_keeps_its_prompt(tmp_path: Path) -> None:
    _, history, store = open_queue(tmp_path / "loom.db")
    record = HistoryRecord.build(item(0, "p").to_json(), {}, "success", [], {})
    history.add(record)
    history.add(record)
    assert history.count() == 1 and stored_prompts(store) == 1
    assert history.entry("p") == record.entry
