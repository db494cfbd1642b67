"""Model folders, extra_model_paths.yaml and confinement of file names to their folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.paths import PathError, Paths, confine


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_default_layout_lists_model_files_recursively(tmp_path: Path) -> None:
    touch(tmp_path / "models" / "checkpoints" / "sd15.safetensors")
    touch(tmp_path / "models" / "checkpoints" / "sub" / "xl.ckpt")
    touch(tmp_path / "models" / "checkpoints" / "readme.txt")
    paths = Paths.from_base(tmp_path)
    assert paths.list_files("checkpoints") == ["sd15.safetensors", "sub/xl.ckpt"]


def test_legacy_folder_names_are_aliases(tmp_path: Path) -> None:
    touch(tmp_path / "models" / "unet" / "u.safetensors")
    touch(tmp_path / "models" / "clip" / "c.safetensors")
    paths = Paths.from_base(tmp_path)
    assert paths.list_files("diffusion_models") == ["u.safetensors"]
    assert paths.list_files("unet") == ["u.safetensors"]
    assert paths.list_files("text_encoders") == ["c.safetensors"]


def test_extra_model_paths_yaml_adds_an_a1111_install(tmp_path: Path) -> None:
    webui = tmp_path / "webui"
    touch(webui / "models" / "Stable-diffusion" / "v15.safetensors")
    touch(webui / "models" / "Lora" / "a.safetensors")
    touch(webui / "models" / "LyCORIS" / "b.safetensors")
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(
        "a111:\n"
        f"    base_path: {webui}\n"
        "    checkpoints: models/Stable-diffusion\n"
        "    loras: |\n"
        "        models/Lora\n"
        "        models/LyCORIS\n"
        "    custom_nodes: extensions_nodes\n", encoding="utf-8")
    paths = Paths.from_base(tmp_path / "loom")
    paths.load_extra_config(config)
    assert paths.list_files("checkpoints") == ["v15.safetensors"]
    assert paths.list_files("loras") == ["a.safetensors", "b.safetensors"]
    assert (webui / "extensions_nodes").resolve() in paths.custom_nodes
    assert paths.find_file("loras", "b.safetensors") == (webui / "models" / "LyCORIS" /
                                                         "b.safetensors").resolve()


def test_relative_base_path_is_relative_to_the_yaml_file(tmp_path: Path) -> None:
    touch(tmp_path / "shared" / "vae" / "v.safetensors")
    config = tmp_path / "conf" / "extra.yaml"
    config.parent.mkdir()
    config.write_text("x:\n  base_path: ../shared\n  vae: vae\n  is_default: true\n")
    paths = Paths.from_base(tmp_path / "loom")
    paths.load_extra_config(config)
    assert paths.folder_dirs("vae")[0] == (tmp_path / "shared" / "vae").resolve()


def test_broken_yaml_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("a: [unclosed\n")
    with pytest.raises(PathError, match="bad.yaml"):
        Paths.from_base(tmp_path).load_extra_config(config)


@pytest.mark.parametrize("name", ["../secret.txt", "/etc/passwd", "a/../../secret.txt", ""])
def test_names_escaping_the_folder_are_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / "root").mkdir()
    with pytest.raises(PathError):
        confine(tmp_path / "root", name)


def test_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    touch(tmp_path / "secret.txt")
    os.symlink(tmp_path / "secret.txt", root / "link.txt")
    with pytest.raises(PathError):
        confine(root, "link.txt")


def test_missing_file_error_names_the_folders(tmp_path: Path) -> None:
    paths = Paths.from_base(tmp_path)
    with pytest.raises(PathError, match="checkpoints"):
        paths.find_file("checkpoints", "nope.safetensors")


def test_unknown_folder_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PathError, match="unknown model folder"):
        Paths.from_base(tmp_path).list_files("nonsense")
