"""Pack nodes that expand into graphs (ComfyUI's `{"result": ..., "expand": graph}`): the new
nodes run inside the prompt, the expanding node's outputs come from them, loops iterate by
expanding again, results are cached, and failures name the expanded node."""

from __future__ import annotations

from typing import Any

from engine.events import NodeLineage, RecordingListener
from engine.validation import validate_prompt
from tests.model_engine import ModelEngine, node, probed


def run_failing(engine: ModelEngine, api: dict[str, Any]) -> dict[str, Any]:
    checked = validate_prompt(api, engine.registry, engine.services)
    assert not checked.node_errors, checked.to_json()
    result = engine.executor.execute(checked.prompt, checked.outputs,
                                     listener=RecordingListener())
    assert result.status == "error"
    assert result.error is not None
    return result.error


def loop(remaining: int, value: int) -> dict[str, Any]:
    """open -> log (shows each iteration's value) ; open -> step (+1) -> close -> show."""
    return {"open": node("ExpandLoopOpen", remaining=remaining, value=value),
            "log": node("ExpandShowInt", value=["open", 3]),
            "step": node("ExpandAdd", a=["open", 2], b=1),
            "close": node("ExpandLoopClose", flow=["open", 0], remaining=["open", 1],
                          value=["step", 0], done=["open", 2]),
            "show": node("ExpandShowInt", value=["close", 0])}


def test_an_expanding_nodes_output_is_the_linked_output_of_its_expansion(
        bound: ModelEngine) -> None:
    result, _ = bound.run(probed({"twice": node("ExpandAddTwice", value=5, amount=3)},
                                 "twice"))
    assert result.values["twice"][0] == [11]


def test_graph_builder_prefixes_ids_with_the_parent_id_and_call_index(
        bound: ModelEngine) -> None:
    result, _ = bound.run(probed({"twice": node("ExpandAddTwice", value=50, amount=3)},
                                 "twice"))
    assert result.values["twice"][1] == ["twice.0.0."]
    assert {"twice.0.0.1", "twice.0.0.2"} <= set(result.executed)


def test_a_plain_dict_expansion_mixes_links_and_literal_results(bound: ModelEngine) -> None:
    api = {"plain": node("ExpandPlain", value=1),
           "show": node("ExpandShowInt", value=["plain", 0])}
    result, _ = bound.run(probed(api, "plain"))
    assert result.values["plain"] == [[101], ["literal"]]
    assert result.outputs["show"] == {"value": [101]}


def test_expanded_nodes_report_progress_on_their_parent(bound: ModelEngine) -> None:
    _, listener = bound.run(probed({"twice": node("ExpandAddTwice", value=60, amount=1)},
                                   "twice"))
    shown = {data["node"]: data["display_node"] for name, data in listener.events
             if name == "executing" and data.get("node")}
    assert shown["twice.0.0.1"] == "twice" and shown["twice.0.0.2"] == "twice"


class LineageListener(RecordingListener):
    def __init__(self) -> None:
        super().__init__()
        self.added: list[NodeLineage] = []

    def node_added(self, prompt_id: str, lineage: NodeLineage) -> None:
        self.added.append(lineage)


def test_listeners_learn_each_added_nodes_parent_display_and_real_node(
        bound: ModelEngine) -> None:
    checked = validate_prompt(loop(remaining=2, value=30), bound.registry, bound.services)
    listener = LineageListener()
    assert bound.executor.execute(checked.prompt, checked.outputs, listener=listener).ok
    first = {lineage.node_id: lineage for lineage in listener.added}["close.0.0.step"]
    assert (first.parent_node, first.display_node, first.real_node_id) == \
        ("close", "step", "close")
    nested = [lineage for lineage in listener.added if lineage.parent_node != "close"]
    assert nested and all(lineage.real_node_id == "close" for lineage in nested)
    assert {lineage.display_node for lineage in nested} <= {"open", "log", "step", "close"}


def test_a_rerun_takes_the_expanding_node_from_the_cache(bound: ModelEngine) -> None:
    api = probed({"twice": node("ExpandAddTwice", value=7, amount=2)}, "twice")
    bound.run(api)
    again, _ = bound.run(api)
    assert again.executed == [] and "twice" in again.cached
    assert again.values["twice"][0] == [11]


def test_expanded_nodes_with_known_inputs_come_from_the_cache(bound: ModelEngine) -> None:
    bound.run(probed({"plain": node("ExpandPlain", value=7)}, "plain"))  # runs Add(7, 100)
    result, _ = bound.run(probed({"twice": node("ExpandAddTwice", value=7, amount=100)},
                                 "twice"))
    assert result.values["twice"][0] == [207]
    assert "twice.0.0.1" in result.cached and "twice.0.0.1" not in result.executed
    assert "twice.0.0.2" in result.executed


def test_a_loop_of_expansions_runs_each_iteration_once(bound: ModelEngine) -> None:
    result, _ = bound.run(loop(remaining=4, value=10))
    assert result.outputs["show"] == {"value": [14]}
    logged = sorted(ui["value"][0] for node_id, ui in result.outputs.items()
                    if node_id == "log" or node_id.endswith(".log"))
    assert logged == [10, 11, 12, 13]  # the pass that ends the loop is blocked


def test_a_loops_expanded_nodes_show_progress_on_the_prompt_nodes_they_copy(
        bound: ModelEngine) -> None:
    _, listener = bound.run(loop(remaining=2, value=0))
    shown = {data["display_node"] for name, data in listener.events
             if name == "executing" and data.get("node") and "." in data["node"]}
    assert shown <= {"open", "log", "step", "close"} and "step" in shown


def test_a_rerun_of_a_loop_is_cached(bound: ModelEngine) -> None:
    bound.run(loop(remaining=3, value=1))
    again, _ = bound.run(loop(remaining=3, value=1))
    assert again.executed == []
    assert again.outputs["show"] == {"value": [4]}


def test_a_loop_with_no_iteration_left_returns_its_value(bound: ModelEngine) -> None:
    result, _ = bound.run(loop(remaining=0, value=5))
    assert result.outputs["show"] == {"value": [5]}
    assert "log" not in result.outputs


def test_a_long_loop_nests_expansions_without_recursion(bound: ModelEngine) -> None:
    result, _ = bound.run(loop(remaining=400, value=0))
    assert result.outputs["show"] == {"value": [400]}


def test_a_failure_inside_an_expansion_names_the_expanded_node(bound: ModelEngine) -> None:
    expanding = node("ExpandInto", inner_class="ExpandFail", value=3)
    error = run_failing(bound, probed({"bad": expanding}, "bad"))
    assert error["node_id"] == "bad" and error["node_type"] == "ExpandInto"
    assert "node bad.0.0.1 (ExpandFail), which node bad expanded into" in \
        error["exception_message"]
    assert "x is 3" in error["exception_message"]


def test_an_expansion_into_an_unknown_class_names_it(bound: ModelEngine) -> None:
    expanding = node("ExpandInto", inner_class="NoSuchNodeClass", value=3)
    error = run_failing(bound, probed({"bad": expanding}, "bad"))
    assert error["node_id"] == "bad"
    assert "'NoSuchNodeClass', which is not a registered node class" in \
        error["exception_message"]


def test_the_expanding_node_counts_as_executed(bound: ModelEngine) -> None:
    result, _ = bound.run(probed({"twice": node("ExpandAddTwice", value=70, amount=1)},
                                 "twice"))
    assert result.executed.index("twice") < result.executed.index("twice.0.0.1")


def test_a_result_linking_to_its_own_node_fails_instead_of_waiting_forever(
        bound: ModelEngine) -> None:
    error = run_failing(bound, probed({"selfish": node("ExpandSelfLink")}, "selfish"))
    assert error["node_id"] == "selfish"
    assert "which waits for this expansion" in error["exception_message"]


def test_a_raw_link_input_receives_the_link_after_its_source_ran(bound: ModelEngine) -> None:
    api = {"source": node("ExpandAdd", a=40, b=2),
           "link": node("ExpandAddOneToLink", value=["source", 0])}
    result, _ = bound.run(probed(api, "link"))
    assert result.values["link"] == [[43], ["['source', 0]"]]
    assert result.executed.index("source") < result.executed.index("link")


def test_a_hidden_input_of_a_packs_own_kind_takes_the_value_an_expansion_gives(
        bound: ModelEngine) -> None:
    api = {"echo": node("ExpandEcho", value=8), "bare": node("ExpandHiddenEcho")}
    result, _ = bound.run(probed(api, "echo", "bare"))
    assert result.values["echo"][0] == [8] and result.values["bare"][0] == [-1]


def test_a_list_of_two_ints_an_expansion_passes_is_a_value_not_a_link(
        bound: ModelEngine) -> None:
    api = {"pair": node("ExpandPair", first=3, second=4)}
    result, _ = bound.run(probed(api, "pair"))
    assert result.values["pair"][0] == ["[3, 4]"]
