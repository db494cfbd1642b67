"""A local Ray runtime started by the tests (CPU only), and Loom servers in subprocesses that run
their prompts on it with `--ray ADDRESS`."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.diffusion.checkpoints.writer import write_random_checkpoint
from tests.web.conftest import ServerProcess, start_server
from tests.web.prompt_helpers import base_with_test_pack

CLUSTER_PACK = Path(__file__).resolve().parent / "packs" / "loom_cluster_nodes.py"
READY_TIMEOUT_S = 300  # three workers importing torch at once on a busy 2-core machine
RAY_CPUS = 6  # logical: each worker reserves 1; room for a restarting or second server's worker


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """The GCS address of a Ray runtime started for these tests (stopped at the end)."""
    pytest.importorskip("engine.cluster.pool", reason="the ray extra is not installed")
    import ray

    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 2**20, namespace="loom-tests")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def cluster_base(base: Path) -> Path:
    """A base with the test node packs and two tiny checkpoints."""
    base_with_test_pack(base)
    shutil.copy(CLUSTER_PACK, base / "custom_nodes" / CLUSTER_PACK.name)
    for name, seed in (("tiny_a.safetensors", 1), ("tiny_b.safetensors", 2)):
        write_random_checkpoint(base / "models" / "checkpoints" / name, "sd15", seed=seed)
    return base


def start_cluster_server(base: Path, address: str, workers: int) -> ServerProcess:
    """`main.py --ray ADDRESS --ray-workers N`, returned once every worker is ready."""
    server = start_server(base, "--ray", address, "--ray-workers", str(workers))
    try:
        wait_until(lambda: all(w["state"] == "ready" for w in workers_of(server)),
                   READY_TIMEOUT_S, server, "the workers to start")
    except BaseException:
        server.stop(kill=True)
        raise
    return server


@pytest.fixture(scope="module")
def cluster(ray_address: str, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[ServerProcess]:
    """One server with three workers, shared by a module's tests."""
    base = cluster_base(tmp_path_factory.mktemp("cluster") / "base")
    server = start_cluster_server(base, ray_address, 3)
    yield server
    server.stop()


def workers_of(server: ServerProcess) -> list[dict[str, Any]]:
    queue = server.get_json("/queue")
    assert isinstance(queue, dict)
    return queue["loom_workers"]


def worker_that_ran(server: ServerProcess, prompt_id: str) -> int:
    for worker in workers_of(server):
        if prompt_id in worker["recent_prompts"]:
            return worker["index"]
    raise AssertionError(f"no worker lists {prompt_id}: {workers_of(server)}")


def wait_until(predicate: Callable[[], bool], timeout: float, server: ServerProcess,
               what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{server.log()}")
