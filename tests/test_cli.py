"""`main.py run`: API, editor and PNG workflows; --set; --dry-run; readable errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from engine.cli import EXIT_FAILED, EXIT_INVALID, EXIT_OK, run_workflow
from tests.stubs import Engine, node


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return Engine(tmp_path)


API = {"1": node("Const", value=3),
       "2": {"class_type": "Scale", "inputs": {"x": ["1", 0], "factor": 2.0, "mode": "round"},
             "_meta": {"title": "Double it"}},
       "3": node("Show", x=["2", 0])}

UI = {"last_node_id": 3, "last_link_id": 2, "version": 0.4, "links": [
    [1, 1, 0, 2, 0, "INT"], [2, 2, 0, 3, 0, "FLOAT"]], "nodes": [
    {"id": 1, "type": "Const", "mode": 0, "inputs": [],
     "outputs": [{"name": "INT", "type": "INT", "links": [1]}], "widgets_values": [3]},
    {"id": 2, "type": "Scale", "mode": 0,
     "inputs": [{"name": "x", "type": "INT", "link": 1}],
     "outputs": [{"name": "FLOAT", "type": "FLOAT", "links": [2]}],
     "widgets_values": [2.0, "round"]},
    {"id": 3, "type": "Show", "mode": 0, "inputs": [{"name": "x", "type": "*", "link": 2}],
     "outputs": [], "widgets_values": []}]}


def run(engine: Engine, path: Path, *args: str, overrides: tuple[str, ...] = (),
        dry_run: bool = False) -> tuple[int, str]:
    out = io.StringIO()
    code = run_workflow(path, engine.registry, engine.services, engine.executor,
                        overrides=list(overrides), dry_run=dry_run, verbose=False, out=out)
    return code, out.getvalue()


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_runs_an_api_workflow(engine: Engine, tmp_path: Path) -> None:
    code, out = run(engine, write_json(tmp_path / "api.json", API))
    assert code == EXIT_OK
    assert "running node 2 (Scale \"Double it\")" in out
    assert "3 node(s) ran" in out


def test_runs_an_editor_workflow(engine: Engine, tmp_path: Path) -> None:
    code, out = run(engine, write_json(tmp_path / "ui.json", UI))
    assert code == EXIT_OK, out


def test_runs_a_png_carrying_the_workflow(engine: Engine, tmp_path: Path) -> None:
    info = PngInfo()
    info.add_text("prompt", json.dumps(API))
    info.add_text("workflow", json.dumps(UI))
    Image.new("RGB", (4, 4)).save(tmp_path / "image.png", pnginfo=info)
    code, _ = run(engine, tmp_path / "image.png")
    assert code == EXIT_OK


def test_set_overrides_a_widget(engine: Engine, tmp_path: Path, capsys) -> None:
    path = write_json(tmp_path / "api.json", API)
    code, _ = run(engine, path, overrides=("1.value=10", "2.mode=floor"))
    assert code == EXIT_OK
    result = engine.executor.cache  # the override reached the node: a 10 was computed
    assert any(entry.outputs == [[20.0]] for entry in result._entries.values())


def test_set_with_an_unknown_node_is_a_usage_error(engine: Engine, tmp_path: Path,
                                                   capsys) -> None:
    code, _ = run(engine, write_json(tmp_path / "api.json", API), overrides=("9.value=1",))
    assert code == EXIT_INVALID
    assert "no node '9'" in capsys.readouterr().err


def test_set_needs_node_dot_input(engine: Engine, tmp_path: Path, capsys) -> None:
    code, _ = run(engine, write_json(tmp_path / "api.json", API), overrides=("value=1",))
    assert code == EXIT_INVALID
    assert "NODE_ID.INPUT=VALUE" in capsys.readouterr().err


def test_dry_run_prints_the_order_and_runs_nothing(engine: Engine, tmp_path: Path) -> None:
    code, out = run(engine, write_json(tmp_path / "api.json", API), dry_run=True)
    assert code == EXIT_OK
    lines = [line.strip() for line in out.splitlines()]
    assert lines[0] == "valid: 3 node(s) would run, in this order:"
    assert lines[1].endswith("node 1 (Const)") and lines[3].endswith("node 3 (Show)")
    assert len(engine.executor.cache) == 0


def test_validation_errors_name_node_input_value_and_fix(engine: Engine, tmp_path: Path,
                                                         capsys) -> None:
    bad = {**API, "2": node("Scale", x=["1", 0], factor=2.0, mode="rnd")}
    code, _ = run(engine, write_json(tmp_path / "api.json", bad))
    assert code == EXIT_INVALID
    err = capsys.readouterr().err
    assert "node 2 (Scale), input 'mode' = 'rnd': Value not in list" in err
    assert "did you mean ['round']" in err


def test_execution_error_exits_non_zero_with_the_failing_node(engine: Engine, tmp_path: Path,
                                                              capsys) -> None:
    failing = {"1": node("Const", value=3), "2": node("Fail", x=["1", 0]),
               "3": node("Show", x=["2", 0])}
    code, _ = run(engine, write_json(tmp_path / "api.json", failing))
    assert code == EXIT_FAILED
    err = capsys.readouterr().err
    assert "node 2 (Fail) failed: RuntimeError: deliberate failure on 3" in err
    assert "input 'x' = 3" in err


def test_unreadable_workflow_file_is_reported(engine: Engine, tmp_path: Path, capsys) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    code, _ = run(engine, path)
    assert code == EXIT_INVALID
    assert "broken.json" in capsys.readouterr().err
