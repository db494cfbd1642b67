"""Executor overhead on graphs of trivial nodes: cold run, fully cached re-run, and a re-run with
one root input changed; microseconds per node. Validation (which the server does once per POST,
before queueing) is timed separately and shown beside it, as is the sum of both.

Targets: <= 20 us/node cold at 10k nodes; <= 5 ms for a fully cached re-run of 1k nodes.
Last line (executor.execute only): `us_per_node_cold_10k=<float> ms_cached_rerun_1k=<float>`."""

from __future__ import annotations

import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.context import NodeContext, Services  # noqa: E402
from engine.executor import Executor  # noqa: E402
from engine.node import Int, Link, Node, NodeResult, NodeSchema, Output  # noqa: E402
from engine.paths import Paths  # noqa: E402
from engine.registry import NodeRegistry  # noqa: E402
from engine.validation import validate_prompt  # noqa: E402

MODULUS = 1_000_003


class BenchConst(Node):
    schema = NodeSchema("BenchConst", (Int("value", 0, min=0, max=MODULUS),), (Output("INT"),))

    def execute(self, ctx: NodeContext, value: int) -> tuple[int]:
        return (value,)


class BenchMix(Node):
    schema = NodeSchema("BenchMix", (Link("a", "INT"), Link("b", "INT"),
                                     Int("salt", 0, min=0, max=MODULUS)), (Output("INT"),))

    def execute(self, ctx: NodeContext, a: int, b: int, salt: int) -> tuple[int]:
        return ((a * 31 + b + salt) % MODULUS,)


class BenchOut(Node):
    schema = NodeSchema("BenchOut", (Link("x", "INT"),), output_node=True)

    def execute(self, ctx: NodeContext, x: int) -> NodeResult:
        return NodeResult(ui={"value": [x]})


def make_graph(count: int, root_value: int = 1) -> dict:
    """A chain of BenchMix nodes, each also reading one random earlier node; 4 const roots."""
    rng = random.Random(count)
    api: dict = {str(i): {"class_type": "BenchConst", "inputs": {"value": root_value + i}}
                 for i in range(4)}
    for i in range(4, count - 1):
        other = i - 4 if i < 8 else rng.randrange(0, i - 1)
        api[str(i)] = {"class_type": "BenchMix",
                       "inputs": {"a": [str(i - 1), 0], "b": [str(other), 0], "salt": i}}
    api[str(count - 1)] = {"class_type": "BenchOut", "inputs": {"x": [str(count - 2), 0]}}
    return api


def timed_run(executor: Executor, registry: NodeRegistry, services: Services,
              api: dict) -> tuple[float, float, int]:
    """(validation seconds, execution seconds, nodes executed)."""
    started = time.perf_counter()
    checked = validate_prompt(api, registry, services)
    validated = time.perf_counter()
    result = executor.execute(checked.prompt, checked.outputs)
    finished = time.perf_counter()
    assert result.ok and not checked.node_errors, (result.error, checked.node_errors)
    return validated - started, finished - validated, len(result.executed)


def best_of(runs: int, measure: Callable[[], tuple[float, float, int]]) -> tuple[float, float]:
    results = [measure() for _ in range(runs)]
    return min(r[0] for r in results), min(r[1] for r in results)


def measure(count: int, services: Services, registry: NodeRegistry) -> dict[str, float]:
    def cold() -> tuple[float, float, int]:
        return timed_run(Executor(registry, services), registry, services, make_graph(count))

    cold_v, cold_e = best_of(5, cold)
    executor = Executor(registry, services)
    timed_run(executor, registry, services, make_graph(count))
    cached_v, cached_e = best_of(9, lambda: timed_run(executor, registry, services,
                                                      make_graph(count)))
    changed_v, changed_e, reran = timed_run(executor, registry, services,
                                            make_graph(count, root_value=7))
    timed_run(executor, registry, services, make_graph(count))
    return {"cold_exec_us": cold_e / count * 1e6, "cold_valid_us": cold_v / count * 1e6,
            "cached_exec_ms": cached_e * 1e3, "cached_valid_ms": cached_v * 1e3,
            "changed_exec_us": changed_e / count * 1e6,
            "changed_valid_us": changed_v / count * 1e6, "changed_reran": reran}


def main() -> None:
    registry = NodeRegistry()
    registry.register_all([BenchConst, BenchMix, BenchOut])
    with tempfile.TemporaryDirectory() as tmp:
        services = Services(Paths.from_base(Path(tmp)))
        measure(100, services, registry)  # warm-up: imports, allocator
        figures = {}
        print(f"{'nodes':>7} | {'cold us/node':>22} | {'cached re-run ms':>22} | "
              f"{'root changed us/node':>22} | re-ran")
        print(f"{'':>7} | {'execute  validate  sum':>22} | {'execute  validate  sum':>22} | "
              f"{'execute  validate  sum':>22} |")
        for count in (100, 1_000, 10_000):
            row = figures[count] = measure(count, services, registry)
            print(f"{count:>7} | {_three(row['cold_exec_us'], row['cold_valid_us'])} | "
                  f"{_three(row['cached_exec_ms'], row['cached_valid_ms'])} | "
                  f"{_three(row['changed_exec_us'], row['changed_valid_us'])} | "
                  f"{int(row['changed_reran'])}")
    print("targets: cold <= 20 us/node at 10k; cached re-run <= 5 ms at 1k")
    print(f"us_per_node_cold_10k={figures[10_000]['cold_exec_us']:.2f} "
          f"ms_cached_rerun_1k={figures[1_000]['cached_exec_ms']:.3f}")


def _three(execute: float, validate: float) -> str:
    return f"{execute:7.2f} {validate:9.2f} {execute + validate:6.2f}"


if __name__ == "__main__":
    main()
