"""Cache policies, byte accounting and keys that are stable across processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.cache import CacheEntry, OutputCache
from engine.digest import content_digest, nbytes_of, stable_key
from engine.values import Latent
from tests.stubs import Engine, node

ROOT = Path(__file__).resolve().parents[1]


def entry_of(nbytes: int) -> CacheEntry:
    return CacheEntry([[torch.zeros(nbytes, dtype=torch.uint8)]], ("x",), None)


def test_ram_policy_evicts_least_recently_used_by_bytes() -> None:
    cache = OutputCache("ram", max_bytes=3000)
    for key in ("a", "b", "c"):
        cache.put(key, entry_of(1000))
    assert cache.total_bytes == 3000
    cache.get("a")  # a becomes most recently used
    cache.put("d", entry_of(1000))
    assert "b" not in cache
    assert all(key in cache for key in ("a", "c", "d"))
    assert cache.total_bytes == 3000


def test_ram_policy_keeps_an_entry_larger_than_the_budget_alone() -> None:
    cache = OutputCache("ram", max_bytes=100)
    cache.put("a", entry_of(10))
    cache.put("big", entry_of(1000))
    assert "big" in cache and "a" not in cache


def test_lru_policy_bounds_the_entry_count() -> None:
    cache = OutputCache("lru", max_entries=2)
    for key in ("a", "b", "c"):
        cache.put(key, entry_of(1))
    assert len(cache) == 2 and "a" not in cache


def test_classic_policy_keeps_only_keys_used_by_the_last_prompt() -> None:
    cache = OutputCache("classic")
    cache.put("a", entry_of(1))
    cache.put("b", entry_of(1))
    cache.end_prompt({"b"})
    assert "a" not in cache and "b" in cache


@pytest.mark.parametrize("kwargs", [{"policy": "lru"}, {"policy": "ram"}, {"policy": "bogus"}])
def test_bad_policy_settings_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        OutputCache(**kwargs)


def test_ram_budget_evicts_during_real_runs(tmp_path: Path) -> None:
    engine = Engine(tmp_path, OutputCache("ram", max_bytes=1))
    api = {"1": node("Const", value=1), "2": node("Show", x=["1", 0])}
    engine.run(api)
    _, events = engine.run(api)
    assert events.executed_nodes() == []  # int outputs hold no tensor bytes: nothing evicted


def test_nbytes_counts_tensors_arrays_and_shared_storage_once() -> None:
    tensor = torch.zeros(10, 10)
    assert nbytes_of([tensor, tensor.view(100)]) == 400
    assert nbytes_of({"a": np.zeros(8, dtype=np.float64)}) == 64
    assert nbytes_of(Latent(torch.zeros(1, 4, 8, 8))) == 4 * 64 * 4
    assert nbytes_of([1, "x", None]) == 0


def test_content_digest_follows_content_not_identity() -> None:
    a, b = torch.arange(6.0).reshape(2, 3), torch.arange(6.0).reshape(2, 3)
    assert content_digest(a) == content_digest(b)
    assert content_digest(a) != content_digest(a.reshape(3, 2))
    assert content_digest(a) != content_digest(a.double())
    assert content_digest(Latent(a)) == content_digest(Latent(b))
    assert content_digest(object()) is None


def test_stable_key_is_identical_in_another_process() -> None:
    obj = ("KSampler", "1", {"seed": 5, "cfg": 7.5, "name": "é"}, [("model", "abc", 0)])
    here = stable_key(obj)
    code = ("from engine.digest import stable_key; "
            f"print(stable_key({obj!r}))")
    there = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                           text=True, check=True, env={"PYTHONHASHSEED": "123",
                                                       "PYTHONPATH": str(ROOT)}).stdout.strip()
    assert here == there


def test_executor_keys_are_identical_in_another_process(tmp_path: Path) -> None:
    code = """
import json, sys
from pathlib import Path
from tests.stubs import Engine, node
engine = Engine(Path(sys.argv[1]))
api = {"1": node("Const", value=3), "2": node("Scale", x=["1", 0], factor=2.0, mode="round"),
       "3": node("Show", x=["2", 0])}
checked = engine.validate(api)
engine.executor.execute(checked.prompt, checked.outputs)
print(json.dumps(sorted(engine.executor.cache._entries)))
"""
    runs = [subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT,
                           capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}).stdout
            for seed in ("1", "2")]
    assert runs[0] == runs[1] and len(runs[0]) > 10
