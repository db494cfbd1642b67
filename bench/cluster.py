"""Ray cluster benchmark (local Ray runtime, CPU).

1. Per-prompt overhead: a small graph (EmptyImage -> ImageInvert -> PreviewImage, a new colour
   each time so nothing is cached) run one prompt at a time in this process (validate +
   execute, what the single-process server does) and on one Ray worker (scheduling, shipping
   the job, the worker's validation and run, streaming events, bringing the preview file back
   and landing it). Target: under 50 ms added per prompt.
2. Throughput with 1, 2 and 4 workers on prompts dominated by a node that waits (sleeps)
   rather than computes, so the machine's cores are not the limit. Target: speed-up over one
   worker of at least 0.9 x N.

Last line: `ray_overhead_ms=<float> speedup_4_workers=<float>`."""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.process_tuning import tune_before_torch  # noqa: E402

tune_before_torch()

import ray  # noqa: E402

from engine.cluster.affinity import prompt_needs  # noqa: E402
from engine.cluster.dispatcher import Dispatcher  # noqa: E402
from engine.cluster.pool import ClusterConfig, WorkerPool  # noqa: E402  (sets Ray's env)
from engine.cluster.protocol import Batch, Job  # noqa: E402
from engine.cluster.shipping import FileLanding, input_files  # noqa: E402
from engine.validation import validate_prompt  # noqa: E402
from main import App, build_app, build_parser  # noqa: E402

WAIT_PACK = '''
import time
from engine.node import Float, Int, Node, NodeResult, NodeSchema

class BenchWait(Node):
    schema = NodeSchema("BenchWait", (Int("tag", 0, min=0, max=10**6),
                                      Float("seconds", 0.5, min=0.0, max=60.0)),
                        output_node=True, idempotent=False)

    def execute(self, ctx, tag, seconds):
        time.sleep(seconds)
        return NodeResult(ui={"text": [str(tag)]})

NODE_CLASS_MAPPINGS = {"BenchWait": BenchWait}
'''
READY_TIMEOUT_S = 600


def small_graph(color: int) -> dict[str, Any]:
    return {"1": {"class_type": "EmptyImage",
                  "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}


def wait_graph(tag: int, seconds: float) -> dict[str, Any]:
    return {"1": {"class_type": "BenchWait", "inputs": {"tag": tag, "seconds": seconds}}}


def in_process_ms(app: App, prompts: int) -> list[float]:
    times = []
    for index in range(prompts):
        started = time.perf_counter()
        checked = validate_prompt(small_graph(index), app.registry, app.services)
        result = app.executor.execute(checked.prompt, checked.outputs)
        assert result.ok, result.error
        times.append((time.perf_counter() - started) * 1000)
    return times


def started_dispatcher(args: argparse.Namespace, workers: int) -> Dispatcher:
    dispatcher = Dispatcher(WorkerPool(ClusterConfig("", workers=workers), args))
    dispatcher.start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while any(slot.state != "ready" for slot in dispatcher.slots):
        if time.monotonic() > deadline or any(s.state == "failed" for s in dispatcher.slots):
            raise RuntimeError(f"workers did not start: {dispatcher.status()}")
        time.sleep(0.2)
    return dispatcher


def job_for(app: App, prompt_id: str, api: dict[str, Any]) -> tuple[Job, Any]:
    checked = validate_prompt(api, app.registry, app.services)
    needs = prompt_needs(checked.prompt, app.registry)
    return Job(prompt_id, api, checked.outputs, {},
               input_files(checked.prompt, app.services.paths)), needs


def cluster_ms(app: App, dispatcher: Dispatcher, prompts: int) -> list[float]:
    """One prompt at a time through the dispatcher, as the server's ClusterWorker does."""
    landing = FileLanding(app.services.paths)
    times = []
    for index in range(prompts):
        started = time.perf_counter()
        job, needs = job_for(app, f"small-{index}", small_graph(index))
        slot = dispatcher.acquire(needs, job.prompt_id)
        assert slot is not None
        outcome = dispatcher.run(slot, job, functools.partial(land, landing, slot.index))
        assert outcome.ok, outcome.error
        for ui in outcome.outputs.values():
            landing.rename(slot.index, ui)
        times.append((time.perf_counter() - started) * 1000)
    return times


def land(landing: FileLanding, worker: int, batch: Batch) -> None:
    landing.land(worker, batch.files)


def drain_seconds(app: App, dispatcher: Dispatcher, prompts: int, wait_s: float) -> float:
    """Wall time for `prompts` waiting prompts, each started on the best free worker."""
    jobs = [job_for(app, f"wait-{i}", wait_graph(i, wait_s)) for i in range(prompts)]
    threads = []
    started = time.perf_counter()
    for job, needs in jobs:
        slot = dispatcher.acquire(needs, job.prompt_id)
        while slot is None:
            dispatcher.wait_for_room(1.0)
            slot = dispatcher.acquire(needs, job.prompt_id)
        thread = threading.Thread(target=dispatcher.run, args=(slot, job, lambda batch: None))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=30, help="small prompts timed per side")
    parser.add_argument("--wait-prompts", type=int, default=16)
    parser.add_argument("--wait-seconds", type=float, default=0.5)
    options = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="loom-bench-cluster-"))
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "bench_wait.py").write_text(WAIT_PACK)
    args = build_parser()[0].parse_args(["--base-directory", str(base), "--ray"])
    app = build_app(args)
    # One local runtime for every pool below (a pool only ends its own workers).
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False,
             log_to_driver=False)

    in_process_ms(app, 3)  # warm up
    local = in_process_ms(app, options.prompts)
    one = started_dispatcher(args, 1)
    cluster_ms(app, one, 3)
    remote = cluster_ms(app, one, options.prompts)
    one.stop()
    print(f"{'small graph, one prompt at a time':40s} {'median ms':>10s} {'p90 ms':>10s}")
    for name, times in (("in process", local), ("Ray, 1 worker", remote)):
        p90 = statistics.quantiles(times, n=10)[-1]
        print(f"{name:40s} {statistics.median(times):10.2f} {p90:10.2f}")
    overhead = statistics.median(remote) - statistics.median(local)

    print(f"\n{options.wait_prompts} prompts waiting {options.wait_seconds} s each")
    print(f"{'workers':>8s} {'seconds':>9s} {'speed-up':>9s} {'target':>8s}")
    seconds: dict[int, float] = {}
    for workers in (1, 2, 4):
        dispatcher = started_dispatcher(args, workers)
        drain_seconds(app, dispatcher, workers, 0.0)  # warm up each worker
        seconds[workers] = drain_seconds(app, dispatcher, options.wait_prompts,
                                         options.wait_seconds)
        dispatcher.stop()
        speedup = seconds[1] / seconds[workers]
        print(f"{workers:8d} {seconds[workers]:9.2f} {speedup:9.2f} {0.9 * workers:8.2f}")
    ray.shutdown()
    print(f"ray_overhead_ms={overhead:.2f} speedup_4_workers={seconds[1] / seconds[4]:.2f}")


if __name__ == "__main__":
    main()
