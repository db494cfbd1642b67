"""The executor: order, caching (exactly which nodes re-run), early cutoff, list semantics,
lazy inputs, failures, interrupts and the events it reports."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine.cache import CacheEntry, OutputCache
from engine.executor import _PromptRun
from tests.stubs import Engine, node


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return Engine(tmp_path)


def diamond(a: int = 1, b: int = 2, factor: float = 2.0) -> dict:
    """1,2 consts -> 3 add -> 4 scale -> 5 show; 2 -> 6 show."""
    return {"1": node("Const", value=a), "2": node("Const", value=b),
            "3": node("Add", a=["1", 0], b=["2", 0]),
            "4": node("Scale", x=["3", 0], factor=factor, mode="round"),
            "5": node("Show", x=["4", 0]), "6": node("Show", x=["2", 0])}


def test_runs_in_dependency_order_and_produces_outputs(engine: Engine) -> None:
    result, events = engine.run(diamond())
    assert result.ok
    order = events.executed_nodes()
    assert sorted(order) == ["1", "2", "3", "4", "5", "6"]
    assert order.index("3") > order.index("1") and order.index("3") > order.index("2")
    assert order.index("5") > order.index("4") > order.index("3")
    assert result.outputs == {"5": {"text": ["6.0"]}, "6": {"text": ["2"]}}


def test_each_node_runs_once_per_prompt(engine: Engine) -> None:
    api = {"1": node("Const", value=1), "2": node("Add", a=["1", 0], b=["1", 0]),
           "3": node("Show", x=["2", 0]), "4": node("Show", x=["1", 0])}
    _, events = engine.run(api)
    assert events.executed_nodes().count("1") == 1


def test_only_needed_nodes_run(engine: Engine) -> None:
    api = diamond()
    api["9"] = node("Const", value=9)  # feeds no output
    _, events = engine.run(api)
    assert "9" not in events.executed_nodes()


def test_identical_rerun_runs_nothing(engine: Engine) -> None:
    engine.run(diamond())
    result, events = engine.run(diamond())
    assert events.executed_nodes() == []
    assert sorted(result.cached) == ["1", "2", "3", "4", "5", "6"]
    assert result.outputs == {"5": {"text": ["6.0"]}, "6": {"text": ["2"]}}


def test_changing_one_widget_reruns_exactly_its_descendants(engine: Engine) -> None:
    engine.run(diamond())
    _, events = engine.run(diamond(factor=3.0))
    assert events.executed_nodes() == ["4", "5"]
    _, events = engine.run(diamond(a=5, factor=3.0))
    assert events.executed_nodes() == ["1", "3", "4", "5"]


def test_changed_root_shared_by_two_branches_reruns_both(engine: Engine) -> None:
    engine.run(diamond())
    _, events = engine.run(diamond(b=7))
    assert sorted(events.executed_nodes()) == ["2", "3", "4", "5", "6"]


def test_early_cutoff_keeps_descendants_cached(engine: Engine) -> None:
    def chain(value: int) -> dict:
        return {"1": node("Const", value=value), "2": node("Parity", x=["1", 0]),
                "3": node("Scale", x=["2", 0], factor=2.0, mode="round"),
                "4": node("Show", x=["3", 0])}

    engine.run(chain(3))
    result, events = engine.run(chain(5))  # parity of 5 == parity of 3
    assert events.executed_nodes() == ["1", "2"]
    assert "3" in result.cached and "4" in result.cached
    assert result.outputs["4"] == {"text": ["2.0"]}


def test_cache_keys_ignore_input_order_in_the_json(engine: Engine) -> None:
    engine.run(diamond())
    reordered = {"5": node("Show", x=["4", 0]), "6": node("Show", x=["2", 0]),
                 "4": {"class_type": "Scale", "inputs": {"mode": "round", "factor": 2.0,
                                                         "x": ["3", 0]}},
                 "3": node("Add", b=["2", 0], a=["1", 0]),
                 "2": node("Const", value=2), "1": node("Const", value=1)}
    _, events = engine.run(reordered)
    assert events.executed_nodes() == []


def test_renumbered_nodes_reuse_the_cache(engine: Engine) -> None:
    engine.run({"1": node("Const", value=4), "2": node("Show", x=["1", 0])})
    _, events = engine.run({"10": node("Const", value=4), "20": node("Show", x=["10", 0])})
    assert events.executed_nodes() == []


def test_list_output_maps_downstream_node_over_items(engine: Engine) -> None:
    api = {"1": node("Range", count=3), "2": node("Const", value=10),
           "3": node("Add", a=["1", 0], b=["2", 0]), "4": node("Show", x=["3", 0])}
    result, _ = engine.run(api)
    assert result.outputs["4"] == {"text": ["10", "11", "12"]}
    assert result.values["3"] == [[10, 11, 12]]


def test_input_is_list_node_receives_the_whole_list_once(engine: Engine) -> None:
    api = {"1": node("Range", count=4), "2": node("Total", x=["1", 0]),
           "3": node("Show", x=["2", 0])}
    result, _ = engine.run(api)
    assert result.outputs["3"] == {"text": ["6"]}


def test_empty_list_input_skips_the_node_calls(engine: Engine) -> None:
    api = {"1": node("Range", count=0), "2": node("Const", value=1),
           "3": node("Add", a=["1", 0], b=["2", 0]), "4": node("Total", x=["3", 0]),
           "5": node("Show", x=["4", 0])}
    result, _ = engine.run(api)
    assert result.values["3"] == [[]]
    assert result.outputs["5"] == {"text": ["0"]}


def lazy_graph(pick: str) -> dict:
    return {"1": node("Const", value=1), "2": node("Const", value=2),
            "3": node("Add", a=["2", 0], b=["2", 0]),
            "4": node("Switch", pick=pick, a=["1", 0], b=["3", 0]),
            "5": node("Show", x=["4", 0])}


def test_lazy_input_not_needed_is_never_evaluated(engine: Engine) -> None:
    result, events = engine.run(lazy_graph("a"))
    assert result.outputs["5"] == {"text": ["1"]}
    assert "2" not in events.executed_nodes() and "3" not in events.executed_nodes()


def test_lazy_input_needed_is_evaluated_before_the_node_runs(engine: Engine) -> None:
    result, events = engine.run(lazy_graph("b"))
    assert result.outputs["5"] == {"text": ["4"]}
    order = events.executed_nodes()
    assert "1" not in order
    assert order.index("3") < order.index("5")


def test_lazy_switch_is_cached_on_rerun(engine: Engine) -> None:
    engine.run(lazy_graph("b"))
    _, events = engine.run(lazy_graph("b"))
    assert events.executed_nodes() == []


def test_failing_node_fails_its_prompt_with_details(engine: Engine) -> None:
    api = {"1": node("Const", value=3), "2": node("Fail", x=["1", 0]),
           "3": node("Show", x=["2", 0])}
    result, events = engine.run(api)
    assert result.status == "error"
    error = result.error
    assert error["node_id"] == "2" and error["node_type"] == "Fail"
    assert error["exception_type"] == "RuntimeError"
    assert error["exception_message"] == "deliberate failure on 3"
    assert error["executed"] == ["1"]
    assert error["current_inputs"] == {"x": [3]}
    assert any("deliberate failure" in line for line in error["traceback"])
    assert events.names()[-2:] == ["execution_error", "executing"]
    assert "execution_success" not in events.names()


def test_executor_keeps_working_after_a_failure(engine: Engine) -> None:
    engine.run({"1": node("Const", value=3), "2": node("Fail", x=["1", 0]),
                "3": node("Show", x=["2", 0])})
    result, events = engine.run({"1": node("Const", value=3), "3": node("Show", x=["1", 0])})
    assert result.ok
    assert events.executed_nodes() == ["3"]  # the Const result survived the failed prompt


def test_event_sequence_of_a_fresh_run(engine: Engine) -> None:
    api = {"1": node("Const", value=3), "2": node("Steps", x=["1", 0], steps=2, delay=0.0),
           "3": node("Show", x=["2", 0])}
    _, events = engine.run(api)
    assert events.names() == [
        "execution_start", "execution_cached",
        "executing", "executing", "progress", "progress", "executing", "executed",
        "execution_success", "executing"]
    progress = [data for name, data in events.events if name == "progress"]
    assert [(p["value"], p["max"], p["node"]) for p in progress] == [(1, 2, "2"), (2, 2, "2")]
    assert events.events[-1][1]["node"] is None
    assert all("prompt_id" in data for _, data in events.events)


def test_event_sequence_of_a_cached_rerun(engine: Engine) -> None:
    api = {"1": node("Const", value=3), "2": node("Show", x=["1", 0])}
    engine.run(api)
    _, events = engine.run(api)
    assert events.names() == ["execution_start", "execution_cached", "executed",
                              "execution_success", "executing"]
    assert events.events[1][1]["nodes"] == ["1", "2"]
    assert events.events[2][1]["output"] == {"text": ["3"]}


def test_interrupt_stops_at_the_next_progress_check(engine: Engine) -> None:
    api = {"1": node("Const", value=3), "2": node("Steps", x=["1", 0], steps=200, delay=0.01),
           "3": node("Show", x=["2", 0])}
    thread, box = engine.run_in_thread(api)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "progress" not in box["listener"].names():
        time.sleep(0.005)
    engine.executor.interrupt.set()
    thread.join(timeout=10)
    result, events = box["result"], box["listener"]
    assert result.status == "interrupted"
    assert result.error["node_id"] == "2" and result.error["node_type"] == "Steps"
    assert result.error["executed"] == ["1"]
    assert "execution_interrupted" in events.names()
    progress = [data for name, data in events.events if name == "progress"]
    assert 0 < len(progress) < 200


def test_interrupt_flag_is_cleared_for_the_next_prompt(engine: Engine) -> None:
    engine.executor.interrupt.set()
    result, _ = engine.run({"1": node("Const", value=3), "2": node("Show", x=["1", 0])})
    assert result.ok


def test_non_idempotent_node_is_not_reused_across_prompts(engine: Engine) -> None:
    api = {"1": node("Random", seed=1), "2": node("Scale", x=["1", 0], factor=1.0, mode="round"),
           "3": node("Show", x=["2", 0])}
    engine.run(api)
    _, events = engine.run(api)
    assert events.executed_nodes() == ["1"]  # same output, so early cutoff spares 2 and 3


def test_always_changed_fingerprint_reruns_the_node(engine: Engine) -> None:
    api = {"1": node("Volatile", value=1), "2": node("Show", x=["1", 0])}
    engine.run(api)
    _, events = engine.run(api)
    assert events.executed_nodes() == ["1"]


def test_timings_are_recorded_per_node(engine: Engine) -> None:
    result, events = engine.run({"1": node("Const", value=1), "2": node("Show", x=["1", 0])})
    assert set(result.timings) == {"1", "2"}
    assert all(seconds >= 0 for seconds in result.timings.values())
    assert events.timings["1"][1] is False


def test_cache_none_reruns_everything(tmp_path: Path) -> None:
    engine = Engine(tmp_path, OutputCache("none"))
    engine.run(diamond())
    _, events = engine.run(diamond())
    assert len(events.executed_nodes()) == 6


def test_cache_lru_keeps_results_of_earlier_prompts(tmp_path: Path) -> None:
    engine = Engine(tmp_path, OutputCache("lru", max_entries=100))
    engine.run(diamond(a=1))
    engine.run(diamond(a=2))
    _, events = engine.run(diamond(a=1))
    assert events.executed_nodes() == []


def test_classic_cache_forgets_results_the_latest_prompt_did_not_use(engine: Engine) -> None:
    engine.run(diamond(a=1))
    engine.run(diamond(a=2))
    _, events = engine.run(diamond(a=1))
    assert events.executed_nodes() == ["1", "3", "4", "5"]


def test_failing_fingerprint_fails_the_prompt_not_the_executor(engine: Engine) -> None:
    result, events = engine.run({"1": node("BadFingerprint", value=1),
                                 "2": node("Show", x=["1", 0])})
    assert result.status == "error"
    assert result.error["node_id"] == "1" and result.error["exception_type"] == "OSError"
    assert "execution_error" in events.names()


def test_identical_non_idempotent_nodes_both_run_in_one_prompt(engine: Engine) -> None:
    api = {"1": node("Random", seed=1), "2": node("Random", seed=1),
           "3": node("Add", a=["1", 0], b=["2", 0]), "4": node("Show", x=["3", 0])}
    _, events = engine.run(api)
    assert sorted(events.executed_nodes()) == ["1", "2", "3", "4"]


def forbid_computing_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_key(*_: object) -> None:
        raise AssertionError("the repeat should be answered from the last run's entries")

    monkeypatch.setattr("engine.executor._PromptRun._key", no_key)


def test_repeat_of_a_fully_cached_prompt_recomputes_no_key(engine: Engine,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    engine.run(diamond())
    forbid_computing_keys(monkeypatch)
    result, events = engine.run(diamond())
    assert result.ok and events.executed_nodes() == []
    assert sorted(result.cached) == ["1", "2", "3", "4", "5", "6"]
    assert result.outputs == {"5": {"text": ["6.0"]}, "6": {"text": ["2"]}}


def stamped() -> dict:
    """1 fingerprinted (Stamped) -> 2 add with 3 const -> 4 show."""
    return {"1": node("Stamped", value=1), "3": node("Const", value=2),
            "2": node("Add", a=["1", 0], b=["3", 0]), "4": node("Show", x=["2", 0])}


def test_repeat_with_unchanged_fingerprints_recomputes_no_key(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    engine.run(stamped())
    forbid_computing_keys(monkeypatch)
    result, events = engine.run(stamped())
    assert result.ok and events.executed_nodes() == []
    assert result.outputs == {"4": {"text": ["3"]}}


def test_repeat_with_a_changed_fingerprint_reruns_that_node_and_what_reads_it(
        engine: Engine) -> None:
    engine.run(stamped())
    engine.services.paths.input.mkdir(parents=True, exist_ok=True)
    (engine.services.paths.input / "stamp.txt").write_text("5")  # the file changed on disk
    result, events = engine.run(stamped())
    assert events.executed_nodes() == ["1", "2", "4"]
    assert result.outputs == {"4": {"text": ["8"]}}


def test_a_widget_changed_recomputes_only_the_keys_of_that_node_and_what_reads_it(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    engine.run(diamond(factor=2.0))
    computed = []
    key = _PromptRun._key

    def counted(run: object, node_id: str) -> str | None:
        computed.append(node_id)
        return key(run, node_id)

    monkeypatch.setattr("engine.executor._PromptRun._key", counted)
    result, events = engine.run(diamond(factor=3.0))
    assert sorted(computed) == ["4", "5"] and events.executed_nodes() == ["4", "5"]
    assert result.outputs["5"] == {"text": ["9.0"]}


def test_a_run_needing_more_nodes_than_the_last_one_computes_their_keys(
        engine: Engine) -> None:
    checked = engine.validate(diamond())
    engine.executor.execute(checked.prompt, ["6"])
    result = engine.executor.execute(checked.prompt, ["5", "6"])
    assert result.ok and sorted(result.executed) == ["1", "3", "4", "5"]


def test_repeat_after_the_cache_was_cleared_runs_everything(engine: Engine) -> None:
    engine.run(diamond())
    engine.executor.cache.clear()
    _, events = engine.run(diamond())
    assert sorted(events.executed_nodes()) == ["1", "2", "3", "4", "5", "6"]


def test_repeat_notices_an_upstream_entry_that_was_recomputed(engine: Engine) -> None:
    engine.run(diamond())
    cache = engine.executor.cache
    # node 3 (Add 1 + 2) recomputed since, to a different value under the same key
    key = next(k for k, entry in cache._entries.items() if entry.outputs == [[3]])
    cache.put(key, CacheEntry([[4]], (("s", (4,)),), None))
    result, events = engine.run(diamond())
    assert events.executed_nodes() == ["4", "5"]
    assert result.outputs["5"] == {"text": ["8.0"]}
