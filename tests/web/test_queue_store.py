"""The SQLite-backed prompt queue and history, in process (no server)."""

from __future__ import annotations

import json
from pathlib import Path

from engine.snapshot import PromptSnapshot
from web.history import History, HistoryRecord
from web.queue import PromptQueue, PromptTexts, QueueItem
from web.store import PromptText, Store


def open_queue(path: Path, max_items: int = 100) -> tuple[PromptQueue, History, Store]:
    store = Store(path)
    history = History(store, max_items)
    return PromptQueue(store, history), history, store


def item(number: int | float, prompt_id: str) -> QueueItem:
    return QueueItem(number, prompt_id, {"1": {"class_type": "X", "inputs": {}}},
                     {"create_time": 1000 + len(prompt_id)}, ["1"])


def record(prompt_id: str, status: str = "success") -> HistoryRecord:
    messages = [["execution_start", {"prompt_id": prompt_id, "timestamp": 5}],
                ["execution_success", {"prompt_id": prompt_id, "timestamp": 9}]]
    return HistoryRecord.build(item(0, prompt_id).to_json(), {}, status, messages, {})


def test_pending_prompts_run_in_number_order(tmp_path: Path) -> None:
    queue, _, _ = open_queue(tmp_path / "loom.db")
    for number, prompt_id in ((2, "b"), (-3, "front"), (1, "a"), (1000.0, "explicit")):
        queue.put(item(number, prompt_id))
    assert [i.prompt_id for i in queue.pending()] == ["front", "a", "b", "explicit"]
    taken = queue.take(timeout=0)
    assert taken is not None and taken.prompt_id == "front"
    assert [i.prompt_id for i in queue.running()] == ["front"] and queue.remaining() == 4


def test_a_running_prompt_goes_to_the_front_after_a_crash(tmp_path: Path) -> None:
    queue, _, store = open_queue(tmp_path / "loom.db")
    queue.put(item(0, "first"))
    queue.put(item(1, "second"))
    queue.put(item(-5, "jumped"))
    assert queue.take(timeout=0).prompt_id == "jumped"  # type: ignore[union-attr]
    store.close()  # the process dies with "jumped" running
    reopened, _, _ = open_queue(tmp_path / "loom.db")
    assert reopened.running() == []
    assert [i.prompt_id for i in reopened.pending()] == ["jumped", "first", "second"]


def test_numbers_continue_after_a_restart(tmp_path: Path) -> None:
    queue, _, store = open_queue(tmp_path / "loom.db")
    assert [queue.next_number() for _ in range(3)] == [0, 1, 2]
    store.close()
    assert open_queue(tmp_path / "loom.db")[0].next_number() == 3


def test_delete_and_clear_leave_the_running_prompt(tmp_path: Path) -> None:
    queue, _, _ = open_queue(tmp_path / "loom.db")
    for number in range(4):
        queue.put(item(number, f"p{number}"))
    queue.take(timeout=0)
    assert queue.delete(["p0", "p2", "unknown"]) == ["p2"]
    assert queue.clear() == ["p1", "p3"]
    assert [i.prompt_id for i in queue.running()] == ["p0"]


def test_duplicate_prompt_id_is_refused(tmp_path: Path) -> None:
    queue, _, _ = open_queue(tmp_path / "loom.db")
    queue.put(item(0, "same"))
    try:
        queue.put(item(1, "same"))
    except ValueError as exc:
        assert "already queued" in str(exc)
    else:
        raise AssertionError("a second prompt with the same id was queued")


def test_finish_moves_the_prompt_to_the_history_atomically(tmp_path: Path) -> None:
    queue, history, _ = open_queue(tmp_path / "loom.db")
    queue.put(item(0, "done"))
    queue.take(timeout=0)
    queue.finish("done", record("done"))
    assert queue.remaining() == 0
    entry = history.entry("done")
    assert entry is not None and entry["status"]["status_str"] == "success"


def history_ids(history: History, **window: int) -> list[str]:
    return [prompt_id for page in history.pages(**window) for prompt_id, _ in page]


def test_history_is_bounded_and_paged_like_comfyui(tmp_path: Path) -> None:
    _, history, _ = open_queue(tmp_path / "loom.db", max_items=3)
    for name in "abcde":
        history.add(record(name))
    assert history_ids(history) == ["c", "d", "e"]  # the oldest were dropped
    assert history_ids(history, max_items=2) == ["d", "e"]
    assert history_ids(history, max_items=1, offset=1) == ["d"]
    assert history_ids(history, max_items=10) == ["c", "d", "e"]


def test_history_survives_a_reopen(tmp_path: Path) -> None:
    _, history, store = open_queue(tmp_path / "loom.db")
    history.add(record("kept", status="error"))
    store.close()
    entry = open_queue(tmp_path / "loom.db")[1].entry("kept")
    assert entry is not None and entry["status"]["completed"] is False


def test_history_jobs_filter_and_sort(tmp_path: Path) -> None:
    _, history, _ = open_queue(tmp_path / "loom.db")
    for name in ("x", "yy", "zzz"):  # create_time grows with the id's length
        history.add(record(name))
    history.add(record("failed-one", status="error"))
    jobs, total = history.jobs({"completed"}, None, "created_at", True, 2)
    assert total == 3 and [job["id"] for job in jobs] == ["zzz", "yy"]
    failed, count = history.jobs({"failed", "cancelled"}, None, "created_at", False, None)
    assert count == 1 and failed[0]["status"] == "failed"


def test_a_damaged_database_is_kept_aside_and_a_new_one_started(tmp_path: Path) -> None:
    (tmp_path / "loom.db").write_bytes(b"this is not an SQLite file" * 100)
    queue, _, _ = open_queue(tmp_path / "loom.db")
    assert queue.remaining() == 0
    kept = list(tmp_path.glob("loom.db.damaged-*"))
    assert len(kept) == 1 and kept[0].read_bytes().startswith(b"this is not")


def test_an_item_is_stored_with_the_prompt_text_it_was_given(tmp_path: Path) -> None:
    queue, _, store = open_queue(tmp_path / "loom.db")
    given = item(0, "p1")
    given.prompt_text = PromptText.of('{"1": {"class_type": "X", "inputs": {}}}')
    queue.put(given)
    store.close()
    reopened, _, _ = open_queue(tmp_path / "loom.db")
    taken = reopened.take(timeout=0)
    assert taken == given and taken is not None and taken.text == given.encoded()


def test_a_history_entry_is_stored_as_the_json_of_its_entry(tmp_path: Path) -> None:
    _, history, _ = open_queue(tmp_path / "loom.db")
    queued = item(3, "p1")
    built = HistoryRecord.build(queued.to_json(), {"1": {"text": ["x"]}}, "success", [], {},
                                queued.parts())
    history.add(built)
    assert history.entry("p1") == built.entry
    assert list(built.entry) == ["prompt", "outputs", "status", "meta", "timings"]


def test_the_same_prompt_again_reuses_its_text_and_a_changed_one_is_encoded() -> None:
    texts = PromptTexts()
    api = {"1": {"class_type": "X", "inputs": {"v": 1}}}
    first = texts.text(api, PromptSnapshot(api))
    again = {"1": {"class_type": "X", "inputs": {"v": 1}}}
    assert texts.text(again, PromptSnapshot(again)) is first
    changed = {"1": {"class_type": "X", "inputs": {"v": 2}}}
    assert json.loads(texts.text(changed, PromptSnapshot(changed)).text) == changed


def test_a_prompt_with_one_node_changed_is_stored_as_the_new_prompt() -> None:
    texts = PromptTexts()
    api = {str(i): {"class_type": "X", "inputs": {"v": i}} for i in range(5)}
    texts.text(api, PromptSnapshot(api))
    changed = {**api, "3": {"class_type": "X", "inputs": {"v": 30}}}
    assert json.loads(texts.text(changed, PromptSnapshot(changed)).text) == changed
