"""Executor overhead on graphs of trivial nodes: cold run, fully cached re-run, and a re-run with
one root input changed; microseconds per node, validation included (it runs on every POST).

Targets: <= 20 us/node cold at 10k nodes; <= 5 ms for a fully cached re-run of 1k nodes.
Last line: `us_per_node_cold_10k=<float> ms_cached_rerun_1k=<float>`."""

from __future__ import annotations

import gc
import random
import sys
import tempfile
import time
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
              api: dict) -> tuple[float, int]:
    started = time.perf_counter()
    checked = validate_prompt(api, registry, services)
    result = executor.execute(checked.prompt, checked.outputs)
    elapsed = time.perf_counter() - started
    assert result.ok and not checked.node_errors, (result.error, checked.node_errors)
    return elapsed, len(result.executed)


def measure(count: int, services: Services, registry: NodeRegistry) -> dict[str, float]:
    executor = Executor(registry, services)
    cold, ran = timed_run(executor, registry, services, make_graph(count))
    assert ran == count
    cached = min(timed_run(executor, registry, services, make_graph(count))[0]
                 for _ in range(5))
    changed, reran = timed_run(executor, registry, services, make_graph(count, root_value=7))
    return {"cold_us_per_node": cold / count * 1e6, "cached_ms": cached * 1e3,
            "cached_us_per_node": cached / count * 1e6,
            "changed_us_per_node": changed / count * 1e6, "changed_reran": reran}


def main() -> None:
    registry = NodeRegistry()
    registry.register_all([BenchConst, BenchMix, BenchOut])
    with tempfile.TemporaryDirectory() as tmp:
        services = Services(Paths.from_base(Path(tmp)))
        gc.freeze()  # as main.py does once startup is done
        measure(100, services, registry)  # warm-up: imports, allocator
        figures = {}
        print(f"{'nodes':>7} {'cold us/node':>13} {'cached ms':>10} {'cached us/node':>15} "
              f"{'root-changed us/node':>21} {'re-ran':>7}")
        for count in (100, 1_000, 10_000):
            row = figures[count] = measure(count, services, registry)
            print(f"{count:>7} {row['cold_us_per_node']:>13.1f} {row['cached_ms']:>10.2f} "
                  f"{row['cached_us_per_node']:>15.2f} {row['changed_us_per_node']:>21.1f} "
                  f"{int(row['changed_reran']):>7}")
    print("targets: cold <= 20 us/node at 10k; cached re-run <= 5 ms at 1k")
    print(f"us_per_node_cold_10k={figures[10_000]['cold_us_per_node']:.2f} "
          f"ms_cached_rerun_1k={figures[1_000]['cached_ms']:.3f}")


if __name__ == "__main__":
    main()
