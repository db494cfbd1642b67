"""Small leaks: /system_stats must not echo secrets from the command line, and a WebSocket that
takes over another connection's clientId is logged."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from tests.web.inprocess import serving
from web.routes_system import redacted_argv
from web.server import LoomServer


def test_system_stats_redacts_the_auth_token(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["main.py", "--auth-token", "s3cret", "--port", "8188"])
    flags = ("--listen", "0.0.0.0", "--auth-token", "s3cret")
    with serving(tmp_path / "base", *flags) as (client, _):
        reply = client.get("/api/system_stats", headers={"Authorization": "Bearer s3cret"})
    assert reply.status == 200
    assert "s3cret" not in reply.text
    assert reply.json()["system"]["argv"] == ["main.py", "--auth-token", "<redacted>",
                                              "--port", "8188"]


def test_secret_flags_are_redacted_in_both_spellings() -> None:
    argv = ["main.py", "--auth-token=abc", "--api-key", "k", "--listen", "0.0.0.0",
            "--db-password=p", "--auth-token", "--verbose"]
    assert redacted_argv(argv) == ["main.py", "--auth-token=<redacted>", "--api-key",
                                   "<redacted>", "--listen", "0.0.0.0",
                                   "--db-password=<redacted>", "--auth-token", "--verbose"]


def test_a_clientid_takeover_is_logged_and_the_new_socket_gets_the_events(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def connect_twice(client: TestClient, server: LoomServer) -> dict:
        first = await client.ws_connect("/ws?clientId=tab-1")
        await first.receive_json()  # the greeting
        second = await client.ws_connect("/ws?clientId=tab-1")
        await second.receive_json()
        server.sockets.send("probe", {"n": 1}, "tab-1")
        message = await second.receive_json(timeout=10)
        await first.close()
        await second.close()
        return message

    with serving(tmp_path / "base") as (client, server), \
            caplog.at_level(logging.WARNING, logger="loom.web.websocket"):
        message = client.loop.run_until_complete(connect_twice(client.client, server))
    assert message == {"type": "probe", "data": {"n": 1}}
    assert "clientId tab-1 connected again" in caplog.text


def test_a_hostile_websocket_message_is_ignored_and_the_socket_stays(tmp_path: Path) -> None:
    async def send_hostile(client: TestClient) -> dict:
        ws = await client.ws_connect("/ws?clientId=tab-2")
        await ws.receive_json()
        await ws.send_str("[" * 100_000 + "]" * 100_000)
        await ws.send_str('{"type": "feature_flags", "data": {"x": NaN}}')
        await ws.send_str('{"type": "feature_flags", "data": {}}')
        reply = await ws.receive_json(timeout=10)
        await ws.close()
        return reply

    with serving(tmp_path / "base") as (client, _):
        reply = client.loop.run_until_complete(send_hostile(client.client))
    assert reply["type"] == "feature_flags"
