"""The execution worker, in process: failures outside any node."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

import web.worker
from engine.cache import OutputCache
from engine.context import InterruptFlag, Services
from engine.executor import ExecutionResult
from engine.paths import Paths
from engine.registry import NodeRegistry
from nodes import builtin_node_types
from web.queue import QueueItem
from web.worker import Worker


class FlakyQueue:
    """A queue whose first take() fails; later ones find nothing."""

    def __init__(self) -> None:
        self.takes = 0
        self.third_take = threading.Event()

    def take(self, timeout: float | None = None) -> None:
        self.takes += 1
        if self.takes >= 3:
            self.third_take.set()
        if self.takes == 1:
            raise RuntimeError("database went away")
        return None

    def wake(self) -> None:
        pass


def test_a_failure_in_the_worker_loop_is_logged_and_the_loop_goes_on(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(web.worker, "POLL_S", 0.01)
    queue = FlakyQueue()
    server = SimpleNamespace(queue=queue, services=SimpleNamespace(model_manager=None),
                             executor=SimpleNamespace(interrupt=InterruptFlag(),
                                                      cache=OutputCache()))
    worker = Worker(server)  # type: ignore[arg-type]
    worker.start()
    try:
        assert queue.third_take.wait(10)
    finally:
        assert worker.stop(10)
    assert "database went away" in caplog.text and "it carries on" in caplog.text


def test_a_restored_prompt_that_no_longer_validates_fails_with_a_clear_error(
        tmp_path: Path) -> None:
    registry = NodeRegistry()
    registry.register_all(builtin_node_types())
    server = SimpleNamespace(registry=registry, services=Services(Paths.from_base(tmp_path)))
    gone = QueueItem(0, "p1", {"1": {"class_type": "RemovedPackNode", "inputs": {}}},
                     {}, ["1"])
    result = Worker(server)._prepared_prompt(gone)  # type: ignore[arg-type]
    assert isinstance(result, ExecutionResult) and result.status == "error"
    assert result.error is not None
    assert "no longer validates" in result.error["exception_message"]
    assert "RemovedPackNode" in result.error["exception_message"]
