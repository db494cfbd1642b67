"""GET /history stays bounded however long the history: without max_items it answers the newest
DEFAULT_REPLY_ITEMS; max_items and offset page through everything, read a page of rows at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.adversarial.payloads import browser_json
from tests.web.inprocess import SyncClient, serving
from web.history import DEFAULT_REPLY_ITEMS, PAGE_ROWS, HistoryRecord
from web.server import LoomServer

STORED = DEFAULT_REPLY_ITEMS + 2 * PAGE_ROWS + 7


def record(prompt_id: str) -> HistoryRecord:
    item = [0, prompt_id, {}, {"create_time": 1}, []]
    return HistoryRecord.build(item, {}, "success", [], {})


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[SyncClient, list[str]]]:
    with serving(tmp_path / "base") as (client, server):
        yield client, store_history(server)


def store_history(server: LoomServer) -> list[str]:
    ids = [f"p{index:04}" for index in range(STORED)]
    with server.store.transaction() as db:
        for prompt_id in ids:
            server.history.insert(db, record(prompt_id))
    return ids


def ids_of(client: SyncClient, path: str) -> list[str]:
    reply = client.get(path)
    assert reply.status == 200
    return list(browser_json(reply.body))


def test_history_without_max_items_answers_the_newest_default_count(
        served: tuple[SyncClient, list[str]]) -> None:
    client, ids = served
    assert ids_of(client, "/history") == ids[-DEFAULT_REPLY_ITEMS:]


def test_max_items_and_offset_page_through_everything(
        served: tuple[SyncClient, list[str]]) -> None:
    client, ids = served
    assert ids_of(client, f"/history?max_items={STORED}") == ids
    assert ids_of(client, "/history?max_items=150&offset=10") == ids[10:160]
    assert ids_of(client, "/history?max_items=3") == ids[-3:]
    assert ids_of(client, f"/history?max_items=5&offset={STORED - 2}") == ids[-2:]
    assert ids_of(client, "/history?max_items=0") == []


def test_an_offset_alone_answers_the_default_count_from_there(
        served: tuple[SyncClient, list[str]]) -> None:
    client, ids = served
    assert ids_of(client, "/history?offset=5") == ids[5:5 + DEFAULT_REPLY_ITEMS]


def test_the_reply_is_read_a_page_of_rows_at_a_time(tmp_path: Path) -> None:
    with serving(tmp_path / "base") as (_, server):
        store_history(server)
        pages = list(server.history.pages(max_items=STORED, offset=0))
    assert max(len(page) for page in pages) == PAGE_ROWS
    assert sum(len(page) for page in pages) == STORED


def test_a_bad_max_items_is_a_400(served: tuple[SyncClient, list[str]]) -> None:
    client, _ = served
    reply = client.get("/history?max_items=lots")
    assert reply.status == 400 and "max_items" in reply.json()["error"]["details"]


@pytest.mark.parametrize("path", ["/history?offset=99999999999999999999",
                                  "/history?max_items=-99999999999999999999",
                                  "/api/jobs?limit=99999999999999999999"])
def test_a_number_beyond_64_bits_is_a_400(served: tuple[SyncClient, list[str]],
                                          path: str) -> None:
    client, _ = served
    reply = client.get(path)
    assert reply.status == 400 and "out of range" in reply.text
