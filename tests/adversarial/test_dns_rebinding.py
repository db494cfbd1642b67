"""DNS rebinding: a page on another site whose host name re-resolves to 127.0.0.1 sends its own
name as Host (and as Origin, so the cross-site check passes). Without a token only Host values
that name this server are answered."""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import pytest
from aiohttp import FormData

from tests.adversarial.payloads import multipart, multipart_headers
from tests.web.inprocess import png_bytes, serving
from web.security import allowed_host_names, names_this_server

REBOUND = {"Host": "evil.example:8188", "Origin": "http://evil.example:8188"}
PROMPT = {"prompt": {"1": {"class_type": "EmptyImage", "inputs": {
    "width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}}


def test_a_rebound_host_cannot_queue_a_prompt(tmp_path: Path) -> None:
    with serving(tmp_path / "base") as (client, server):
        reply = client.post("/prompt", json=PROMPT, headers=REBOUND)
        assert reply.status == 403
        assert "--allowed-hosts evil.example" in reply.text
        assert server.queue.remaining() == 0


@pytest.mark.parametrize("path", ["/history", "/api/system_stats", "/api/userdata?dir=x",
                                  "/object_info", "/"])
def test_a_rebound_host_reads_nothing(tmp_path: Path, path: str) -> None:
    with serving(tmp_path / "base") as (client, _):
        assert client.get(path, headers=REBOUND).status == 403


def test_a_rebound_host_cannot_upload_or_write_user_data(tmp_path: Path) -> None:
    base = tmp_path / "base"
    with serving(base) as (client, _):
        upload = client.post("/upload/image", data=multipart(b"x.png", png_bytes()),
                             headers={**REBOUND, **multipart_headers()})
        assert upload.status == 403
        assert client.post("/userdata/a.json", data=b"{}", headers=REBOUND).status == 403
    assert not (base / "input" / "x.png").exists()
    assert not (base / "user" / "default" / "a.json").exists()


def test_a_rebound_host_cannot_open_the_websocket(tmp_path: Path) -> None:
    with serving(tmp_path / "base") as (client, _):
        assert client.websocket_status("/ws", headers=REBOUND) == 403


@pytest.mark.parametrize("host", ["127.0.0.1:8188", "localhost:8188", "LOCALHOST", "[::1]:8188",
                                  "127.0.0.2", "studio.localhost:8188"])
def test_loopback_names_are_answered(tmp_path: Path, host: str) -> None:
    with serving(tmp_path / "base") as (client, _):
        assert client.get("/api/system_stats", headers={"Host": host}).status == 200


def test_allowed_hosts_admits_a_name(tmp_path: Path) -> None:
    form = FormData()
    form.add_field("image", png_bytes(), filename="a.png", content_type="image/png")
    with serving(tmp_path / "base", "--allowed-hosts", "studio.lan,render.lan") as (client, _):
        headers = {"Host": "render.lan:8188"}
        assert client.get("/api/system_stats", headers=headers).status == 200
        assert client.post("/upload/image", data=form, headers=headers).status == 200
        assert client.get("/api/system_stats", headers=REBOUND).status == 403


def test_the_listen_address_names_this_server() -> None:
    allowed = allowed_host_names(Namespace(listen="192.168.1.5,[fd00::5]", allowed_hosts=[]))
    assert names_this_server("192.168.1.5", allowed)
    assert names_this_server("fd00::5", allowed)
    assert not names_this_server("192.168.1.6", allowed)


def test_with_a_token_the_token_guards_instead(tmp_path: Path) -> None:
    flags = ("--listen", "0.0.0.0", "--auth-token", "s3cret")
    with serving(tmp_path / "base", *flags) as (client, _):
        headers = {"Host": "studio.example:8188", "Authorization": "Bearer s3cret"}
        assert client.get("/api/system_stats", headers=headers).status == 200
        assert client.get("/api/system_stats", headers=REBOUND).status == 401
