"""Node definitions, model folders, extensions, system stats, logs and the editor's static files
(API.md section 1)."""

from __future__ import annotations

import json
import logging
import struct
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.web.inprocess import SyncClient, serving
from web import static

PACK_SOURCE = '''
WEB_DIRECTORY = "./js"
NODE_CLASS_MAPPINGS = {}
'''


@pytest.fixture
def base(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    pack = base / "custom_nodes" / "web pack"
    (pack / "js" / "sub").mkdir(parents=True)
    (pack / "__init__.py").write_text(PACK_SOURCE)
    (pack / "js" / "hello.js").write_text("console.log('hello');")
    (pack / "js" / "sub" / "deeper.js").write_text("")
    for folder, name in (("embeddings", "easynegative.safetensors"),
                         ("checkpoints", "tiny.safetensors"), ("checkpoints", "sub/other.ckpt"),
                         ("checkpoints", "notes.txt")):
        (base / "models" / folder / name).parent.mkdir(parents=True, exist_ok=True)
        (base / "models" / folder / name).write_bytes(b"x")
    return base


@pytest.fixture
def client(base: Path) -> Iterator[SyncClient]:
    with serving(base) as (client, _):
        yield client


def test_object_info_lists_every_node(client: SyncClient) -> None:
    info = client.get("/api/object_info").json()
    assert {"EmptyImage", "ImageInvert", "SaveImage"} <= set(info)
    assert info["ImageInvert"]["name"] == "ImageInvert"


def test_object_info_of_one_class_and_of_an_unknown_one(client: SyncClient) -> None:
    one = client.get("/object_info/ImageInvert").json()
    assert list(one) == ["ImageInvert"]
    assert client.get("/object_info/NoSuchNode").json() == {}


def test_embeddings_are_names_without_extension(client: SyncClient) -> None:
    assert client.get("/embeddings").json() == ["easynegative"]


def test_models_lists_folder_kinds_and_files(client: SyncClient) -> None:
    assert {"checkpoints", "loras", "vae"} <= set(client.get("/models").json())
    assert client.get("/models/checkpoints").json() == ["sub/other.ckpt", "tiny.safetensors"]
    assert client.get("/models/nothing").status == 404


def test_experiment_models_shapes(base: Path, client: SyncClient) -> None:
    folders = client.get("/api/experiment/models").json()
    checkpoints = next(entry for entry in folders if entry["name"] == "checkpoints")
    assert checkpoints["folders"] == [str(base / "models" / "checkpoints")]
    assert "configs" not in {entry["name"] for entry in folders}
    files = client.get("/api/experiment/models/checkpoints").json()
    assert [(f["name"], f["pathIndex"], f["size"]) for f in files] == [
        ("sub/other.ckpt", 0, 1), ("tiny.safetensors", 0, 1)]
    assert set(files[0]) == {"name", "pathIndex", "modified", "created", "size"}
    assert client.get("/api/experiment/models/nothing").status == 404


def test_view_metadata_reads_the_safetensors_header(base: Path, client: SyncClient) -> None:
    header = json.dumps({"__metadata__": {"ss_network_dim": "4"}}).encode()
    (base / "models" / "loras").mkdir(parents=True)
    (base / "models" / "loras" / "style.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header)
    reply = client.get("/api/view_metadata/loras?filename=style.safetensors")
    assert reply.json() == {"ss_network_dim": "4"}
    assert client.get("/api/view_metadata/loras?filename=..%2F..%2Fx.safetensors").status == 404


def test_extensions_lists_editor_pack_and_loom_scripts(client: SyncClient) -> None:
    urls = client.get("/api/extensions").json()
    assert "/extensions/core/groupNode.js" in urls
    assert "/extensions/web%20pack/hello.js" in urls
    assert "/extensions/web%20pack/sub/deeper.js" in urls
    assert "/extensions/loom/loom_timing.js" in urls
    for url in ("/extensions/core/groupNode.js", "/extensions/web%20pack/hello.js",
                "/extensions/loom/loom_timing.js"):
        assert client.get(url).status == 200, url
    assert client.get("/extensions/web%20pack/../__init__.py").status in (403, 404)
    assert client.get("/extensions/web%20pack/%2e%2e/__init__.py").status in (403, 404)


def test_system_stats_shape(client: SyncClient) -> None:
    stats = client.get("/api/system_stats").json()
    system = stats["system"]
    assert system["comfyui_version"] == "0.8.0"
    assert system["required_frontend_version"] == static.FRONTEND_VERSION == "1.35.9"
    assert system["embedded_python"] is False
    assert system["ram_total"] >= system["ram_free"] > 0
    assert {"os", "python_version", "pytorch_version", "argv", "loom_version"} <= set(system)
    device = stats["devices"][0]
    assert {"name", "type", "index", "vram_total", "vram_free", "torch_vram_total",
            "torch_vram_free"} == set(device)


def test_features_free_and_empty_answers(client: SyncClient) -> None:
    assert client.get("/api/features").json()["supports_preview_metadata"] is True
    reply = client.post("/api/free", json={"unload_models": True, "free_memory": True})
    assert (reply.status, reply.body) == (200, b"")
    assert client.post("/api/free", data=b"{bad").status == 400
    for path in ("/api/i18n", "/api/global_subgraphs", "/api/workflow_templates"):
        assert client.get(path).json() == {}, path


def test_internal_routes_exist_bare_only(base: Path, client: SyncClient) -> None:
    paths = client.get("/internal/folder_paths").json()
    assert paths["checkpoints"] == [str(base / "models" / "checkpoints")]
    assert client.get("/api/internal/folder_paths").status == 404
    assert client.get("/internal/files/output").json() == []
    assert client.get("/internal/files/models").status == 400


def test_internal_logs_hold_recent_lines(client: SyncClient) -> None:
    logging.getLogger("loom.test").warning("a line the error dialog shows")
    assert "a line the error dialog shows" in client.get("/internal/logs").json()
    raw = client.get("/internal/logs/raw").json()
    assert raw["entries"][-1]["m"].endswith("a line the error dialog shows\n")
    assert set(raw["size"]) == {"cols", "rows"}
    reply = client.request("PATCH", "/internal/logs/subscribe",
                           json={"enabled": True, "clientId": "abc"})
    assert reply.status == 200


def test_editor_index_is_served_uncached(client: SyncClient) -> None:
    reply = client.get("/")
    assert reply.status == 200
    assert b'<div id="vue-app">' in reply.body
    assert reply.headers["Cache-Control"] == "no-cache"
    assert client.get("/scripts/app.js").status == 200


def test_missing_frontend_root_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(static.FrontendMissing, match="pip install comfyui-frontend-package"):
        static.frontend_root(Namespace(front_end_root=tmp_path / "empty"))
