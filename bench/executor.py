"""Executor overhead on graphs of trivial nodes, like for like with what the editor's re-runs
cost. Per graph size, execution and validation (the server's PromptValidator, which remembers
the previous prompt) are timed separately and summed (what a user waits for):

- cold: a fresh executor and validator;
- repeat, replayed: the same prompt again, no node fingerprinted;
- repeat, fingerprinted: the same prompt again, its 4 roots fingerprinted like checkpoint
  loaders and file inputs (their fingerprint is computed on every run, as a file's would be);
- output widget changed: the fingerprinted graph with one widget of its output node changed
  (only that node runs; everything else is looked up by key);
- root changed: every node re-runs (us/node).

Targets: <= 20 us/node cold at 10k nodes; <= 5 ms for a cached re-run of 1k nodes. Last line
(executor.execute only): `us_per_node_cold_10k=<float> ms_cached_rerun_1k=<float>
ms_cached_rerun_1k_fingerprinted=<float>`."""

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
from engine.node import Int, Link, Node, NodeResult, NodeSchema, Output, String  # noqa: E402
from engine.paths import Paths  # noqa: E402
from engine.registry import NodeRegistry  # noqa: E402
from engine.validation import PromptValidator  # noqa: E402

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


class BenchFileConst(BenchConst):
    """A root fingerprinted like a file input: by the file's size and modification time."""

    schema = NodeSchema("BenchFileConst", (Int("value", 0, min=0, max=MODULUS),),
                        (Output("INT"),))

    def fingerprint(self, ctx: NodeContext, value: int) -> tuple[int, int]:
        stat = ctx.paths.input.stat()
        return (stat.st_size, stat.st_mtime_ns)


class BenchOut(Node):
    schema = NodeSchema("BenchOut", (Link("x", "INT"), String("label", default="value")),
                        output_node=True)

    def execute(self, ctx: NodeContext, x: int, label: str) -> NodeResult:
        return NodeResult(ui={label: [x]})


def make_graph(count: int, root_value: int = 1, root_type: str = "BenchConst",
               label: str = "value") -> dict:
    """A chain of BenchMix nodes, each also reading one random earlier node; 4 roots."""
    rng = random.Random(count)
    api: dict = {str(i): {"class_type": root_type, "inputs": {"value": root_value + i}}
                 for i in range(4)}
    for i in range(4, count - 1):
        other = i - 4 if i < 8 else rng.randrange(0, i - 1)
        api[str(i)] = {"class_type": "BenchMix",
                       "inputs": {"a": [str(i - 1), 0], "b": [str(other), 0], "salt": i}}
    api[str(count - 1)] = {"class_type": "BenchOut",
                           "inputs": {"x": [str(count - 2), 0], "label": label}}
    return api


class Session:
    """An executor and a validator that live across prompts, as in the server."""

    def __init__(self, registry: NodeRegistry, services: Services) -> None:
        self.registry, self.services = registry, services
        self.executor = Executor(registry, services)
        self.validator = PromptValidator(registry, services)

    def run(self, api: dict) -> tuple[float, float, int]:
        """(execution seconds, validation seconds, nodes executed)."""
        started = time.perf_counter()
        checked = self.validator.validate(api)
        validated = time.perf_counter()
        result = self.executor.execute(checked.prompt, checked.outputs)
        finished = time.perf_counter()
        assert result.ok and not checked.node_errors, (result.error, checked.node_errors)
        return finished - validated, validated - started, len(result.executed)


def best_of(runs: int, measure: Callable[[], tuple[float, float, int]]) -> tuple[float, float]:
    results = [measure() for _ in range(runs)]
    return min(r[0] for r in results), min(r[1] for r in results)


def measure(count: int, registry: NodeRegistry, services: Services) -> dict[str, tuple]:
    """Per scenario: (execute, validate) in seconds."""
    def fresh(api: dict) -> Callable[[], tuple[float, float, int]]:
        return lambda: Session(registry, services).run(api)

    figures = {"cold": best_of(5, fresh(make_graph(count)))}
    session = Session(registry, services)
    session.run(make_graph(count))
    figures["replayed"] = best_of(9, lambda: session.run(make_graph(count)))
    filed = make_graph(count, root_type="BenchFileConst")
    session.run(filed)
    figures["fingerprinted"] = best_of(9, lambda: session.run(make_graph(
        count, root_type="BenchFileConst")))
    labels = iter(range(10**6))
    figures["output_changed"] = best_of(9, lambda: session.run(make_graph(
        count, root_type="BenchFileConst", label=f"v{next(labels)}")))
    execute, validate, reran = session.run(make_graph(count, root_value=7))
    assert reran == count, reran
    figures["root_changed"] = (execute, validate)
    return figures


def main() -> None:
    registry = NodeRegistry()
    registry.register_all([BenchConst, BenchFileConst, BenchMix, BenchOut])
    with tempfile.TemporaryDirectory() as tmp:
        services = Services(Paths.from_base(Path(tmp)))
        services.paths.input.mkdir(parents=True, exist_ok=True)
        measure(100, registry, services)  # warm-up: imports, allocator
        rows = {count: measure(count, registry, services) for count in (100, 1_000, 10_000)}
    print(f"{'nodes':>7} {'scenario':>15} | {'execute':>9} {'validate':>9} {'sum':>9}")
    for count, figures in rows.items():
        for scenario, (execute, validate) in figures.items():
            per_node = scenario in ("cold", "root_changed")
            scale, unit = (1e6 / count, "us/node") if per_node else (1e3, "ms")
            print(f"{count:>7} {scenario:>15} | {execute * scale:9.2f} {validate * scale:9.2f} "
                  f"{(execute + validate) * scale:9.2f} {unit}")
    print("targets: cold <= 20 us/node at 10k; cached re-run <= 5 ms at 1k")
    print(f"us_per_node_cold_10k={rows[10_000]['cold'][0] / 10_000 * 1e6:.2f} "
          f"ms_cached_rerun_1k={rows[1_000]['replayed'][0] * 1e3:.3f} "
          f"ms_cached_rerun_1k_fingerprinted={rows[1_000]['fingerprinted'][0] * 1e3:.3f}")


if __name__ == "__main__":
    main()
