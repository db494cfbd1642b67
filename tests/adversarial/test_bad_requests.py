"""Requests that used to be 500s: names longer than a file system allows, a NUL byte in a
multipart file name, a multipart header line over aiohttp's limit. Each is a 400 in ComfyUI's
error shape, and nothing is left half-written."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import FormData

from tests.adversarial.payloads import browser_json, multipart, multipart_headers
from tests.web.inprocess import Reply, SyncClient, png_bytes, serving

LONG = "a" * 300 + ".png"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[SyncClient]:
    with serving(tmp_path / "base") as (client, _):
        yield client


@pytest.fixture
def base(client: SyncClient, tmp_path: Path) -> Path:
    """The served base folder (the server is started first)."""
    return tmp_path / "base"


def structured_400(reply: Reply) -> str:
    assert reply.status == 400, reply.text
    body = browser_json(reply.body)
    assert set(body) == {"error", "node_errors"}
    return body["error"]["details"]


def files_under(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_view_of_an_over_long_name_is_a_400(client: SyncClient) -> None:
    for query in ({"filename": LONG}, {"filename": "a.png", "subfolder": "d" * 300}):
        assert "at most 255" in structured_400(client.get("/view", params=query))


def test_user_data_with_an_over_long_name_is_a_400(client: SyncClient, base: Path) -> None:
    name = "b" * 300 + ".json"
    structured_400(client.post(f"/userdata/{name}", data=b"{}"))
    structured_400(client.get(f"/userdata/{name}"))
    structured_400(client.post(f"/userdata/ok.json/move/{name}"))
    structured_400(client.request("DELETE", f"/userdata/{name}"))
    assert files_under(base / "user" / "default") == []


def test_an_upload_with_an_over_long_name_is_a_400_and_writes_nothing(
        client: SyncClient, base: Path) -> None:
    form = FormData()
    form.add_field("image", png_bytes(), filename=LONG, content_type="image/png")
    assert "at most 255" in structured_400(client.post("/upload/image", data=form))
    assert files_under(base / "input") == []


def test_a_nul_byte_in_a_multipart_file_name_is_a_400(client: SyncClient, base: Path) -> None:
    body = multipart(b"a\x00b.png", png_bytes())
    structured_400(client.post("/upload/image", data=body, headers=multipart_headers()))
    assert files_under(base / "input") == []


def test_a_multipart_line_over_the_limit_is_a_400(client: SyncClient, base: Path) -> None:
    body = multipart(b"a" * 20_000 + b".png", png_bytes())
    structured_400(client.post("/upload/image", data=body, headers=multipart_headers()))
    assert files_under(base / "input") == []


def test_a_multipart_body_without_its_boundary_is_a_400(client: SyncClient) -> None:
    reply = client.post("/upload/image", data=b"--x\r\n",
                        headers={"Content-Type": "multipart/form-data"})
    structured_400(reply)
