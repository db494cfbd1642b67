"""Users, settings and user data (API.md section 5): shapes, status codes, persistence on disk,
and confinement to the user's folder."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.web.inprocess import SyncClient, serving


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    return tmp_path / "base" / "user" / "default"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[SyncClient]:
    with serving(tmp_path / "base") as (client, _):
        yield client


def save(client: SyncClient, name: str, content: bytes, query: str = "") -> object:
    reply = client.post(f"/api/userdata/{name}{query}", data=content)
    assert reply.status == 200, reply.text
    return reply.json()


# -- users and settings ------------------------------------------------------------------------

def test_users_is_a_single_server_user(client: SyncClient) -> None:
    assert client.get("/api/users").json() == {"storage": "server", "migrated": True}


def test_settings_are_empty_on_first_run(client: SyncClient) -> None:
    assert client.get("/api/settings").json() == {}
    assert client.get("/api/settings/Comfy.TutorialCompleted").json() is None


def test_setting_round_trip_persists_on_disk(tmp_path: Path, user_dir: Path,
                                             client: SyncClient) -> None:
    assert client.post("/api/settings/Comfy.InstalledVersion", data=b'"1.35.9"').body == b""
    client.post("/api/settings/Comfy.LinkRenderMode", data=b"1")
    assert client.get("/api/settings/Comfy.InstalledVersion").json() == "1.35.9"
    on_disk = json.loads((user_dir / "comfy.settings.json").read_text())
    assert on_disk == {"Comfy.InstalledVersion": "1.35.9", "Comfy.LinkRenderMode": 1}
    with serving(tmp_path / "base") as (restarted, _):
        assert restarted.get("/settings").json() == on_disk


def test_post_settings_merges_several(client: SyncClient) -> None:
    client.post("/settings/a", data=b"1")
    assert client.post("/settings", json={"b": True, "c": {"x": [1]}}).status == 200
    assert client.get("/settings").json() == {"a": 1, "b": True, "c": {"x": [1]}}


def test_setting_that_is_not_json_is_400(client: SyncClient) -> None:
    assert client.post("/settings/a", data=b"{nope").status == 400


def test_corrupt_settings_file_is_kept_aside_not_lost(user_dir: Path, client: SyncClient) -> None:
    user_dir.mkdir(parents=True, exist_ok=True)
    (user_dir / "comfy.settings.json").write_text("{broken")
    assert client.get("/settings").json() == {}
    kept = [name for name in os.listdir(user_dir) if name.startswith("comfy.settings.json.corrupt")]
    assert len(kept) == 1
    assert (user_dir / kept[0]).read_text() == "{broken"


# -- user data ---------------------------------------------------------------------------------

def test_userdata_save_with_encoded_slash_and_read_back(user_dir: Path,
                                                        client: SyncClient) -> None:
    reply = save(client, "workflows%2Fbar%20test.json", b'{"nodes": []}',
                 "?overwrite=false&full_info=true")
    assert reply["path"] == "workflows/bar test.json"
    assert reply["size"] == 13
    assert set(reply) == {"path", "size", "modified", "created"}
    assert (user_dir / "workflows" / "bar test.json").read_bytes() == b'{"nodes": []}'
    assert client.get("/api/userdata/workflows%2Fbar%20test.json").body == b'{"nodes": []}'


def test_userdata_save_without_full_info_answers_the_path(client: SyncClient) -> None:
    assert save(client, "workflows%2Fa.json", b"{}") == "workflows/a.json"


def test_userdata_overwrite_false_on_existing_file_is_409(client: SyncClient) -> None:
    save(client, "workflows%2Fa.json", b"1")
    reply = client.post("/api/userdata/workflows%2Fa.json?overwrite=false", data=b"2")
    assert (reply.status, reply.text) == (409, "File already exists")
    save(client, "workflows%2Fa.json", b"3")  # no overwrite parameter: replaced
    assert client.get("/api/userdata/workflows%2Fa.json").body == b"3"


def test_userdata_missing_file_is_404(client: SyncClient) -> None:
    assert client.get("/api/userdata/user.css").status == 404
    assert client.get("/api/userdata/workflows%2F.index.json").status == 404


def test_userdata_listing_shapes(client: SyncClient) -> None:
    save(client, "workflows%2Fclient.json", b"{}")
    save(client, "workflows%2Fsub%2Fdeep.json", b"[]")
    base = "/api/userdata?dir=workflows"
    assert client.get(f"{base}&recurse=true").json() == ["client.json", "sub/deep.json"]
    assert client.get(base).json() == ["client.json"]
    assert client.get(f"{base}&recurse=true&split=true").json() == [
        ["client.json", "client.json"], ["sub/deep.json", "sub", "deep.json"]]
    full = client.get(f"{base}&recurse=true&split=false&full_info=true").json()
    assert [entry["path"] for entry in full] == ["client.json", "sub/deep.json"]
    assert full[0]["size"] == 2 and isinstance(full[0]["modified"], float)


def test_userdata_listing_of_a_missing_folder_is_404(client: SyncClient) -> None:
    reply = client.get("/api/userdata?dir=subgraphs&recurse=true&split=false&full_info=true")
    assert (reply.status, reply.text) == (404, "Directory not found")


def test_userdata_move_and_delete(user_dir: Path, client: SyncClient) -> None:
    save(client, "workflows%2Fold.json", b"{}")
    moved = client.post("/api/userdata/workflows%2Fold.json/move/workflows%2Fnew.json"
                        "?overwrite=false")
    assert (moved.status, moved.json()) == (200, "workflows/new.json")
    assert not (user_dir / "workflows" / "old.json").exists()
    full = client.post("/api/userdata/workflows%2Fnew.json/move/archive%2Fx.json?full_info=true")
    assert full.json()["path"] == "archive/x.json"
    assert client.delete("/api/userdata/archive%2Fx.json").status == 204
    assert client.delete("/api/userdata/archive%2Fx.json").status == 404


def test_userdata_move_onto_existing_without_overwrite_is_409(client: SyncClient) -> None:
    save(client, "a.json", b"1")
    save(client, "b.json", b"2")
    assert client.post("/api/userdata/a.json/move/b.json?overwrite=false").status == 409
    assert client.post("/api/userdata/nothing.json/move/c.json").status == 404


def test_v2_userdata_lists_the_tree(client: SyncClient) -> None:
    assert client.get("/api/v2/userdata").json() == []
    save(client, "workflows%2Fclient.json", b"{}")
    tree = client.get("/api/v2/userdata").json()
    assert tree[0] == {"name": "workflows", "path": "workflows", "type": "directory"}
    files = client.get("/api/v2/userdata?path=workflows").json()
    assert [(f["name"], f["path"], f["type"], f["size"]) for f in files] == [
        ("client.json", "workflows/client.json", "file", 2)]
    assert client.get("/api/v2/userdata?path=nothing").status == 404
    assert client.get("/api/v2/userdata?path=workflows%2Fclient.json").status == 400


@pytest.mark.parametrize("name", ["..%2F..%2Fsecret", "%2e%2e%2f%2e%2e%2fsecret",
                                  "%2Fetc%2Fpasswd", "workflows%2F..%2F..%2F..%2Fsecret"])
def test_userdata_paths_outside_the_user_folder_are_403(tmp_path: Path, client: SyncClient,
                                                        name: str) -> None:
    (tmp_path / "base" / "secret").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "base" / "secret").write_text("do not read")
    assert client.get(f"/api/userdata/{name}").status == 403
    assert client.post(f"/api/userdata/{name}", data=b"x").status == 403
    assert client.delete(f"/api/userdata/{name}").status == 403
    save(client, "a.json", b"{}")
    assert client.post(f"/api/userdata/a.json/move/{name}").status == 403
    assert (tmp_path / "base" / "secret").read_text() == "do not read"


def test_userdata_listing_outside_the_user_folder_is_403(client: SyncClient) -> None:
    assert client.get("/api/userdata?dir=..%2F..").status == 403
    assert client.get("/api/v2/userdata?path=..").status == 403


def test_userdata_symlink_pointing_outside_is_403_and_not_listed(tmp_path: Path, user_dir: Path,
                                                                  client: SyncClient) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text("{}")
    (user_dir / "workflows").mkdir(parents=True, exist_ok=True)
    os.symlink(outside / "secret.json", user_dir / "workflows" / "link.json")
    os.symlink(outside, user_dir / "escape")
    assert client.get("/api/userdata/workflows%2Flink.json").status == 403
    assert client.post("/api/userdata/escape%2Fnew.json", data=b"{}").status == 403
    assert client.get("/api/userdata?dir=workflows").json() == []
    assert client.get("/api/userdata?dir=escape").status == 403
    assert not (outside / "new.json").exists()
