"""Files moved between server and workers: inputs a prompt names, outputs its nodes wrote, and
their landing in the server's folders under names no other file has."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.cluster.protocol import ShippedFile
from engine.cluster.shipping import FileLanding, OutputCollector, input_files
from engine.graph import Prompt
from engine.paths import PathError, Paths


def png(name: str, data: bytes = b"png", subfolder: str = "", kind: str = "output",
        ) -> ShippedFile:
    return ShippedFile(kind, subfolder, name, data)


def test_a_landed_file_keeps_its_name_when_it_is_free(tmp_path: Path) -> None:
    landing = FileLanding(Paths.from_base(tmp_path))
    [path] = landing.land(0, [png("ComfyUI_00001_.png", subfolder="sub")])
    assert path == tmp_path / "output" / "sub" / "ComfyUI_00001_.png"
    assert path.read_bytes() == b"png"


def test_a_taken_name_gets_the_next_free_counter(tmp_path: Path) -> None:
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "ComfyUI_00001_.png").write_bytes(b"first")
    landing = FileLanding(Paths.from_base(tmp_path))
    [path] = landing.land(1, [png("ComfyUI_00001_.png", b"second")])
    assert path.name == "ComfyUI_00002_.png"
    assert (tmp_path / "output" / "ComfyUI_00001_.png").read_bytes() == b"first"


def test_two_workers_naming_the_same_file_both_land(tmp_path: Path) -> None:
    landing = FileLanding(Paths.from_base(tmp_path))
    first = landing.land(0, [png("x_00001_.png", b"a")])
    second = landing.land(1, [png("x_00001_.png", b"b")])
    assert [p.read_bytes() for p in first + second] == [b"a", b"b"]
    assert {p.name for p in first + second} == {"x_00001_.png", "x_00002_.png"}


def test_a_name_without_a_counter_gets_a_numbered_twin(tmp_path: Path) -> None:
    landing = FileLanding(Paths.from_base(tmp_path))
    landing.land(0, [png("clip.webm")])
    [path] = landing.land(1, [png("clip.webm", b"other")])
    assert path.name == "clip_1.webm"


def test_ui_entries_are_renamed_to_where_the_files_landed(tmp_path: Path) -> None:
    landing = FileLanding(Paths.from_base(tmp_path))
    landing.land(0, [png("x_00001_.png", b"a")])
    landing.land(1, [png("x_00001_.png", b"b")])
    ui = {"images": [{"filename": "x_00001_.png", "subfolder": "", "type": "output"}],
          "text": ["kept"]}
    assert landing.rename(1, ui) == {
        "images": [{"filename": "x_00002_.png", "subfolder": "", "type": "output"}],
        "text": ["kept"]}


def test_a_landed_subfolder_cannot_leave_the_output_folder(tmp_path: Path) -> None:
    landing = FileLanding(Paths.from_base(tmp_path / "base"))
    with pytest.raises(PathError, match="outside"):
        landing.land(0, [png("evil.png", subfolder="../..")])
    assert not (tmp_path / "evil.png").exists()


def test_the_files_a_prompt_names_are_shipped_with_it(tmp_path: Path) -> None:
    paths = Paths.from_base(tmp_path)
    (tmp_path / "input" / "masks").mkdir(parents=True)
    (tmp_path / "input" / "masks" / "m.png").write_bytes(b"mask")
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "old.png").write_bytes(b"old")
    prompt = Prompt.parse({
        "1": {"class_type": "LoadImage", "inputs": {"image": "masks/m.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "old.png [output]"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat\n" * 1000}}})
    shipped = {(f.kind, f.subfolder, f.filename): f.data for f in input_files(prompt, paths)}
    assert shipped == {("input", "masks", "m.png"): b"mask", ("output", "", "old.png"): b"old"}


def test_an_output_is_shipped_once_and_leaves_an_empty_stand_in(tmp_path: Path) -> None:
    paths = Paths.from_base(tmp_path)
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "x_00001_.png").write_bytes(b"png")
    ui = {"images": [{"filename": "x_00001_.png", "subfolder": "", "type": "output"}]}
    collector = OutputCollector(paths)
    assert [f.data for f in collector.collect(ui)] == [b"png"]
    assert collector.collect(ui) == []
    assert (tmp_path / "output" / "x_00001_.png").read_bytes() == b""
