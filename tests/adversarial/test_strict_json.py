"""Request bodies are strict JSON (400 in ComfyUI's error shape otherwise, nothing queued or kept
half-done), and every reply is strict JSON, even for history rows stored with NaN/Infinity."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.adversarial.payloads import browser_json
from tests.web.inprocess import Reply, SyncClient, serving
from web.history import HistoryRecord
from web.jsonio import MAX_DEPTH, dumps
from web.server import LoomServer

PROMPT = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                       "color": 0}},
          "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
PROMPT_TEXT = json.dumps(PROMPT)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[SyncClient, LoomServer]]:
    with serving(tmp_path / "base") as pair:
        yield pair


def refused(reply: Reply, kind: str = "invalid_json") -> str:
    """The details of a 400 in ComfyUI's error shape."""
    assert reply.status == 400, reply.text
    body = browser_json(reply.body)
    assert body["error"]["type"] == kind and body["node_errors"] == {}
    return body["error"]["details"]


def post(client: SyncClient, body: str | bytes) -> Reply:
    return client.post("/prompt", data=body.encode() if isinstance(body, str) else body)


def nothing_kept(server: LoomServer) -> bool:
    return server.queue.remaining() == 0 and not server.worker._prepared


def test_a_body_that_is_not_json_is_a_400(served: tuple[SyncClient, LoomServer]) -> None:
    client, server = served
    assert "not JSON" in refused(post(client, b"{not json"))
    assert "not JSON" in refused(post(client, b"\xff\xfe{"))
    assert nothing_kept(server)


def test_deep_nesting_is_a_400(served: tuple[SyncClient, LoomServer]) -> None:
    client, server = served
    assert "100000 levels" in refused(post(client, "[" * 100_000 + "]" * 100_000))
    deep = "{\"a\": " * 950 + "1" + "}" * 950
    body = PROMPT_TEXT.replace('"color": 0', f'"color": 0, "note": {deep}')
    assert f"at most {MAX_DEPTH}" in refused(post(client, '{"prompt": ' + body + "}"))
    assert nothing_kept(server)


def test_nesting_up_to_the_limit_is_accepted(served: tuple[SyncClient, LoomServer]) -> None:
    client, _ = served
    note = "[" * (MAX_DEPTH - 5) + "]" * (MAX_DEPTH - 5)
    body = PROMPT_TEXT.replace('"color": 0', f'"color": 0, "note": {note}')
    assert post(client, '{"prompt": ' + body + "}").status == 200


def test_a_lone_surrogate_is_a_400(served: tuple[SyncClient, LoomServer]) -> None:
    client, server = served
    body = '{"prompt": ' + PROMPT_TEXT + ', "prompt_id": "\\ud800"}'
    assert "surrogate" in refused(post(client, body))
    assert nothing_kept(server)


def test_a_surrogate_pair_is_text(served: tuple[SyncClient, LoomServer]) -> None:
    client, _ = served
    reply = post(client, '{"prompt": ' + PROMPT_TEXT + ', "prompt_id": "\\ud83d\\ude00"}')
    assert reply.status == 200 and reply.json()["prompt_id"] == "\U0001f600"


@pytest.mark.parametrize("number", ['"nan"', '"inf"', '"-Infinity"', '"1e999"'])
def test_a_non_finite_queue_number_is_a_400(served: tuple[SyncClient, LoomServer],
                                             number: str) -> None:
    client, server = served
    details = refused(post(client, f'{{"prompt": {PROMPT_TEXT}, "number": {number}}}'),
                      "invalid_prompt")
    assert "not finite" in details
    assert nothing_kept(server)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_non_finite_number_anywhere_in_the_body_is_a_400(
        served: tuple[SyncClient, LoomServer], literal: str) -> None:
    client, server = served
    body = PROMPT_TEXT.replace('"color": 0', f'"color": 0, "note": {literal}')
    refused(post(client, '{"prompt": ' + body + "}"))
    assert nothing_kept(server)


def test_an_integer_over_4300_digits_is_a_400(served: tuple[SyncClient, LoomServer]) -> None:
    client, server = served
    assert "4300" in refused(post(client, '{"prompt": {}, "number": ' + "9" * 5000 + "}"))
    assert nothing_kept(server)


def test_other_json_routes_refuse_bad_bodies_the_same_way(
        served: tuple[SyncClient, LoomServer]) -> None:
    client, _ = served
    for path in ("/queue", "/interrupt", "/history", "/free", "/settings/x", "/settings"):
        refused(client.post(path, data=b'{"clear": NaN}'))
        refused(client.post(path, data=b"[" * 1000))


def test_the_writer_turns_non_finite_numbers_into_null() -> None:
    text = dumps({"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5]})
    assert browser_json(text) == {"a": None, "b": [None, None, 1.5]}


def store_row_with_non_finite_numbers(server: LoomServer, prompt_id: str) -> None:
    """A history row as older Loom versions stored it: NaN/Infinity written by json.dumps."""
    item = [float("inf"), prompt_id, {"1": {"class_type": "X", "inputs": {"note": float("nan")}}},
            {"create_time": 1}, ["1"]]
    record = HistoryRecord.build(item, {"1": {"value": [float("nan")]}}, "success", [], {})
    with server.store.transaction() as db:
        db.execute("INSERT INTO history (prompt_id, entry, job, status, create_time, duration) "
                   "VALUES (?, ?, ?, ?, 1, 0)", (prompt_id, json.dumps(record.entry),
                                                 json.dumps(record.job), record.job["status"]))


def test_old_history_rows_with_nan_are_served_as_strict_json(
        served: tuple[SyncClient, LoomServer]) -> None:
    client, server = served
    store_row_with_non_finite_numbers(server, "old")
    for path in ("/history", "/history?max_items=5", "/history/old", "/api/jobs",
                 "/api/jobs/old"):
        reply = client.get(path)
        assert reply.status == 200, path
        browser_json(reply.body)  # raises on NaN / Infinity
    entry = browser_json(client.get("/history/old").body)["old"]
    assert entry["prompt"][0] is None and entry["outputs"]["1"]["value"] == [None]
