"""Prompt parsing, pruning and ordering."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.graph import CycleError, GraphPlanner, Prompt, is_link
from tests.stubs import node


def test_links_and_literals_are_told_apart() -> None:
    prompt = Prompt.parse({"1": node("Const", value=[1, 2, 3]), "2": node("Show", x=["1", 0])})
    assert prompt.nodes["1"].literals == {"value": [1, 2, 3]}  # a list that is not a link
    assert prompt.nodes["2"].links == {"x": ("1", 0)}
    assert is_link(["3", 0]) and is_link([3, 1])
    assert not is_link(["3", True]) and not is_link(["a", "b"]) and not is_link([1, 2, 3])


def test_required_nodes_prunes_what_no_output_reads() -> None:
    prompt = Prompt.parse({"1": node("Const"), "2": node("Show", x=["1", 0]),
                           "3": node("Const")})
    assert prompt.required_nodes(["2"]) == {"1", "2"}


def test_order_puts_producers_first() -> None:
    prompt = Prompt.parse({"3": node("Show", x=["2", 0]), "2": node("Add", a=["1", 0],
                                                                    b=["1", 0]),
                           "1": node("Const")})
    assert prompt.order_for(["3"]) == ["1", "2", "3"]


def test_cycle_error_names_the_loop() -> None:
    prompt = Prompt.parse({"1": node("Add", a=["2", 0], b=["2", 0]),
                           "2": node("Parity", x=["1", 0]), "3": node("Show", x=["2", 0])})
    with pytest.raises(CycleError) as caught:
        prompt.order_for(["3"])
    assert set(caught.value.cycle) == {"1", "2"} and caught.value.cycle[0] == caught.value.cycle[-1]


def test_planner_reuses_the_order_of_a_known_structure() -> None:
    planner = GraphPlanner(capacity=1)
    first = Prompt.parse({"1": node("Const", value=1), "2": node("Show", x=["1", 0])})
    again = Prompt.parse({"1": node("Const", value=9), "2": node("Show", x=["1", 0])})
    order = first.order_for(["2"], planner)
    assert again.order_for(["2"], planner) is order
    other = Prompt.parse({"5": node("Const"), "6": node("Show", x=["5", 0])})
    assert other.order_for(["6"], planner) == ["5", "6"]
    assert len(planner._orders) == 1  # capacity bound


def test_networkx_is_imported_only_when_a_graph_is_first_ordered() -> None:
    """Start-up (custom_nodes_startup bench) does not pay for networkx's ~300 modules."""
    code = ("import sys\n"
            "from engine.graph import Prompt\n"
            "assert 'networkx' not in sys.modules\n"
            "prompt = Prompt.parse({'1': {'class_type': 'Const', 'inputs': {}}})\n"
            "assert prompt.order_for(['1']) == ['1']\n"
            "assert 'networkx' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parent.parent)
