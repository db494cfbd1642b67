"""Model-affinity scheduling: which idle worker a prompt goes to."""

from __future__ import annotations

from engine.cluster.affinity import PromptNeeds, model_files, structural_keys
from engine.cluster.protocol import WorkerReport
from engine.cluster.scheduler import WorkerView, choose_worker
from engine.graph import Prompt
from engine.registry import NodeRegistry
from nodes import builtin_node_types

CKPT = ("checkpoints", "a.safetensors")
LORA = ("loras", "style.safetensors")
ALL_FILES = {"checkpoints": ["a.safetensors", "b.safetensors"], "loras": ["style.safetensors"]}


def worker(index: int, *, loaded: tuple = (), keys: frozenset[str] = frozenset(),
           running: int = 0, capacity: int = 1, files: dict | None = None,
           ready: bool = True) -> WorkerView:
    report = WorkerReport(f"worker {index}", "host", 100 + index, "cpu", 90, capacity,
                          loaded_models=list(loaded), recent_keys=keys,
                          model_files=ALL_FILES if files is None else files)
    return WorkerView(index, report, running=running, ready=ready)


def needs(*models: tuple[str, str], keys: frozenset[str] = frozenset()) -> PromptNeeds:
    return PromptNeeds(frozenset(models), keys)


def test_an_idle_worker_holding_the_checkpoint_wins() -> None:
    chosen = choose_worker(needs(CKPT), [worker(0), worker(1, loaded=(CKPT,)), worker(2)])
    assert chosen is not None and chosen.index == 1


def test_holding_more_of_the_models_beats_holding_fewer() -> None:
    workers = [worker(0, loaded=(CKPT,)), worker(1, loaded=(CKPT, LORA))]
    chosen = choose_worker(needs(CKPT, LORA), workers)
    assert chosen is not None and chosen.index == 1


def test_loaded_models_beat_a_longer_cached_prefix() -> None:
    workers = [worker(0, keys=frozenset({"k1", "k2", "k3"})), worker(1, loaded=(CKPT,))]
    chosen = choose_worker(needs(CKPT, keys=frozenset({"k1", "k2", "k3"})), workers)
    assert chosen is not None and chosen.index == 1


def test_without_loaded_models_the_longest_cached_prefix_wins() -> None:
    workers = [worker(0, keys=frozenset({"k1"})), worker(1, keys=frozenset({"k1", "k2"}))]
    chosen = choose_worker(needs(keys=frozenset({"k1", "k2", "k3"})), workers)
    assert chosen is not None and chosen.index == 1


def test_otherwise_the_least_loaded_worker_wins() -> None:
    workers = [worker(0, running=1, capacity=2), worker(1, running=0, capacity=2)]
    chosen = choose_worker(needs(), workers)
    assert chosen is not None and chosen.index == 1


def test_a_busy_worker_is_passed_over_even_with_the_checkpoint() -> None:
    chosen = choose_worker(needs(CKPT), [worker(0, loaded=(CKPT,), running=1), worker(1)])
    assert chosen is not None and chosen.index == 1


def test_a_worker_without_the_model_file_is_chosen_last() -> None:
    workers = [worker(0, files={}), worker(1)]
    chosen = choose_worker(needs(CKPT), workers)
    assert chosen is not None and chosen.index == 1


def test_no_worker_is_chosen_when_all_are_busy_or_down() -> None:
    assert choose_worker(needs(), [worker(0, running=1), worker(1, ready=False)]) is None


def test_a_prompt_needs_the_model_files_its_loaders_name() -> None:
    registry = NodeRegistry()
    registry.register_all(builtin_node_types())
    prompt = Prompt.parse({
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
        "7": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1],
                                                      "lora_name": "style.safetensors",
                                                      "strength_model": 1.0,
                                                      "strength_clip": 1.0}}})
    assert model_files(prompt, registry) == {CKPT, LORA}


def test_structural_keys_match_when_the_upstream_graph_matches() -> None:
    def graph(seed: int) -> Prompt:
        return Prompt.parse({"1": {"class_type": "A", "inputs": {"x": 1}},
                             "2": {"class_type": "B", "inputs": {"a": ["1", 0], "seed": seed}},
                             "3": {"class_type": "C", "inputs": {"b": ["2", 0]}}})
    first, second = structural_keys(graph(1)), structural_keys(graph(2))
    assert first["1"] == second["1"]
    assert first["2"] != second["2"] and first["3"] != second["3"]
