"""A pack's routes, send_sync and web extensions through server.PromptServer.instance, on a real
Loom server over HTTP and a real WebSocket."""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.comfy_api.conftest import PACKS
from tests.web.conftest import ServerProcess, start_server
from tests.web.inprocess import serving
from tests.web.prompt_helpers import submit, ws_url
from tests.web.wsclient import EventRecorder, is_json


def base_with_route_pack(base: Path) -> Path:
    shutil.copytree(PACKS / "route_pack", base / "custom_nodes" / "route_pack")
    return base


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(base_with_route_pack(tmp_path_factory.mktemp("packs") / "base"))
    yield process
    process.stop()


def test_a_pack_route_is_served(server: ServerProcess) -> None:
    assert server.get_json("/route_pack/hello") == {"hello": "from route_pack"}


def test_send_sync_reaches_the_submitting_client_with_client_and_node_ids(
        server: ServerProcess) -> None:
    recorder = EventRecorder(ws_url(server))
    try:
        submit(server, {"7": {"class_type": "RoutePackPing", "inputs": {"text": "hi"}}},
               recorder.sid)
        ping = recorder.wait_for(lambda m: is_json(m, "route_pack.ping"))
    finally:
        recorder.close()
    assert ping["data"] == {"text": "hi", "node": "7", "client": recorder.sid}


def test_the_packs_web_directory_is_served_as_an_editor_extension(
        server: ServerProcess) -> None:
    assert "/extensions/route_pack/route_pack.js" in server.get_json("/extensions")
    with urllib.request.urlopen(server.url + "/extensions/route_pack/route_pack.js") as reply:
        assert b"route_pack loaded" in reply.read()


def test_pack_load_failures_are_listed_for_the_editor(server: ServerProcess) -> None:
    listed = server.get_json("/loom/custom_nodes")
    assert listed == {"loaded": ["route_pack"], "failed": []}


def test_pack_routes_sit_behind_the_same_auth_token_as_looms(tmp_path: Path) -> None:
    base = base_with_route_pack(tmp_path / "base")
    with serving(base, "--auth-token", "secret") as (client, _):
        assert client.get("/route_pack/hello").status == 401
        reply = client.get("/route_pack/hello", headers={"Authorization": "Bearer secret"})
        assert reply.status == 200 and json.loads(reply.body) == {"hello": "from route_pack"}
