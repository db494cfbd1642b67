"""Symlinked models: files and whole folders the owner linked into models/ from a shared store
load, while a name from a request still cannot climb out of its folder. input/ and output/ keep
the stricter rule (a link must stay inside once resolved): the API reads, writes and serves them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.diffusion.checkpoints.writer import write_random_checkpoint
from engine.paths import InvalidName, PathError, Paths
from tests.model_engine import ModelEngine, node, probed
from tests.web.inprocess import serving


@pytest.fixture
def shared_store(tmp_path: Path) -> Path:
    """A model store outside Loom's base folder (an A1111 or ComfyUI install)."""
    store = tmp_path / "model_store"
    (store / "sdxl").mkdir(parents=True)
    (store / "x.safetensors").write_bytes(b"weights")
    (store / "sdxl" / "y.safetensors").write_bytes(b"weights")
    return store


def linked_base(tmp_path: Path, store: Path) -> Path:
    checkpoints = tmp_path / "base" / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    os.symlink(store / "x.safetensors", checkpoints / "linked.safetensors")
    os.symlink(store / "sdxl", checkpoints / "shared_sdxl")
    return tmp_path / "base"


def test_a_linked_file_and_a_linked_folder_are_found(tmp_path: Path, shared_store: Path) -> None:
    paths = Paths.from_base(linked_base(tmp_path, shared_store))
    assert paths.list_files("checkpoints") == ["linked.safetensors",
                                               "shared_sdxl/y.safetensors"]
    assert paths.find_file("checkpoints", "linked.safetensors").read_bytes() == b"weights"
    assert paths.find_file("checkpoints", "shared_sdxl/y.safetensors").is_file()


@pytest.mark.parametrize("name", ["../../secret.safetensors", "/etc/passwd",
                                  "shared_sdxl/../../../model_store/x.safetensors",
                                  "shared_sdxl/../linked.safetensors", "..\\x.safetensors",
                                  "C:/x.safetensors"])
def test_a_requested_name_still_cannot_climb_out(tmp_path: Path, shared_store: Path,
                                                 name: str) -> None:
    paths = Paths.from_base(linked_base(tmp_path, shared_store))
    with pytest.raises(PathError, match="outside"):
        paths.find_file("checkpoints", name)


def test_an_over_long_model_name_is_an_invalid_name(tmp_path: Path) -> None:
    with pytest.raises(InvalidName, match="at most 255"):
        Paths.from_base(tmp_path).find_file("checkpoints", "x" * 300 + ".safetensors")


def test_a_link_loop_in_a_model_folder_ends_the_listing(tmp_path: Path,
                                                        shared_store: Path) -> None:
    base = linked_base(tmp_path, shared_store)
    os.symlink(base / "models" / "checkpoints", base / "models" / "checkpoints" / "loop")
    names = Paths.from_base(base).list_files("checkpoints")
    assert "linked.safetensors" in names and len(names) < 10


def test_a_checkpoint_linked_into_models_loads(tmp_path: Path) -> None:
    engine = ModelEngine(tmp_path / "base")
    write_random_checkpoint(tmp_path / "model_store" / "tiny.safetensors", "sd15")
    checkpoints = tmp_path / "base" / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    os.symlink(tmp_path / "model_store" / "tiny.safetensors", checkpoints / "linked.safetensors")
    result, _ = engine.run(probed({"1": node("CheckpointLoaderSimple",
                                             ckpt_name="linked.safetensors")}, "1"))
    assert result.ok


def test_input_links_leading_outside_stay_refused(tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "input").mkdir(parents=True, exist_ok=True)
    (tmp_path / "secret.png").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.png", base / "input" / "link.png")
    with serving(base) as (client, _):
        assert client.get("/view", params={"filename": "link.png", "type": "input"}).status == 403
    with pytest.raises(PathError, match="outside"):
        Paths.from_base(base).find_file("input", "link.png")
