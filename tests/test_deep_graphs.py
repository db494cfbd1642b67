"""Graphs 10,000 nodes deep run with Python's default recursion limit: no stage (conversion,
validation, keys, execution, lazy inputs) recurses once per level of depth."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from engine.workflow import ui_to_api
from tests.stubs import Engine, node

DEPTH = 10_000


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return Engine(tmp_path)


def chain(depth: int, root: int = 1) -> dict[str, Any]:
    """Const 0 -> Parity 1 -> Add 2 (reads 1 twice) -> Add 3 (reads 2 and 1) ... -> Show;
    every Add's output is one more than the last."""
    api = {"0": node("Const", value=root), "1": node("Parity", x=["0", 0]),
           "2": node("Add", a=["1", 0], b=["1", 0])}
    for index in range(3, depth - 1):
        api[str(index)] = node("Add", a=[str(index - 1), 0], b=["1", 0])
    api[str(depth - 1)] = node("Show", x=[str(depth - 2), 0])
    return api


def lazy_chain(depth: int) -> dict[str, Any]:
    """Const 0 -> Switch 1 (lazily picks a: 0) -> Switch 2 (lazily picks a: 1) ... -> Show."""
    api = {"0": node("Const", value=7)}
    for index in range(1, depth - 1):
        api[str(index)] = node("Switch", pick="a", a=[str(index - 1), 0], b=["0", 0])
    api[str(depth - 1)] = node("Show", x=[str(depth - 2), 0])
    return api


def editor_chain(depth: int) -> dict[str, Any]:
    """The editor's format: Const 1 -> Parity 2 -> Parity 3 ... -> Show."""
    nodes = [{"id": 1, "type": "Const", "mode": 0, "inputs": [], "widgets_values": [1],
              "outputs": [{"name": "INT", "type": "INT", "links": [1]}]}]
    for index in range(2, depth + 1):
        nodes.append({"id": index, "type": "Parity" if index < depth else "Show", "mode": 0,
                      "widgets_values": [],
                      "inputs": [{"name": "x", "type": "INT", "link": index - 1}],
                      "outputs": [{"name": "INT", "type": "INT", "links": [index]}]})
    links = [[index, index, 0, index + 1, 0, "INT"] for index in range(1, depth)]
    return {"nodes": nodes, "links": links, "version": 0.4}


def test_the_recursion_limit_is_python_default() -> None:
    assert sys.getrecursionlimit() <= 1000


def test_a_10000_deep_chain_validates_and_runs(engine: Engine) -> None:
    result, _ = engine.run(chain(DEPTH))
    assert result.ok and len(result.executed) == DEPTH
    assert result.outputs[str(DEPTH - 1)] == {"text": [str(DEPTH - 2)]}


def test_a_10000_deep_chain_runs_again_from_the_cache(engine: Engine) -> None:
    engine.run(chain(DEPTH))
    result, _ = engine.run(chain(DEPTH))
    assert result.ok and result.executed == [] and len(result.cached) == DEPTH


def test_a_10000_deep_chain_with_its_root_changed_stops_at_the_first_equal_output(
        engine: Engine) -> None:
    engine.run(chain(DEPTH, root=1))
    result, _ = engine.run(chain(DEPTH, root=3))  # Parity of 3 equals Parity of 1: cutoff
    assert result.ok and result.executed == ["0", "1"]


def test_a_10000_deep_chain_of_lazy_inputs_runs(engine: Engine) -> None:
    result, _ = engine.run(lazy_chain(DEPTH))
    assert result.ok and result.outputs[str(DEPTH - 1)] == {"text": ["7"]}


def test_a_10000_deep_editor_workflow_converts(engine: Engine) -> None:
    api = ui_to_api(editor_chain(DEPTH), engine.registry.object_info(engine.services))
    assert len(api) == DEPTH and api[str(DEPTH)]["inputs"]["x"] == [str(DEPTH - 1), 0]
    assert engine.validate(api).ok
