"""The dispatcher's bookkeeping over a fake pool (no Ray): workers becoming ready, slots taken
and freed, deaths counted per prompt."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from engine.cluster.affinity import PromptNeeds
from engine.cluster.dispatcher import Dispatcher
from engine.cluster.protocol import Batch, Job, Outcome, WorkerLost, WorkerReport

NO_NEEDS = PromptNeeds(frozenset(), frozenset())


class FakePool:
    """Workers that are ready at once; `dead` ones fail health checks; run() ends at once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.dead: set[int] = set()
        self.started = False
        self.interrupted: list[tuple[int, str | None]] = []

    def start(self) -> None:
        self.started = True

    def report(self, index: int) -> WorkerReport:
        return WorkerReport(f"worker {index} (fake)", "fake", index, "cpu", 1, 1)

    def wait_ready(self, index: int, timeout: float | None = None) -> WorkerReport | None:
        return self.report(index)

    def reports(self, indices: list[int], timeout: float,
                ) -> tuple[dict[int, WorkerReport], set[int]]:
        alive = {i: self.report(i) for i in indices if i not in self.dead}
        return alive, {i for i in indices if i in self.dead}

    def run(self, index: int, job: Job, label: str,
            on_batch: Callable[[Batch], None]) -> Outcome:
        if index in self.dead:
            raise WorkerLost(index, label, "killed")
        return Outcome(job.prompt_id, "success", {}, None, [], [], {}, self.report(index))

    def interrupt(self, index: int, prompt_id: str | None) -> None:
        self.interrupted.append((index, prompt_id))

    def free(self, unload_models: bool, free_memory: bool) -> None:
        pass

    def shutdown(self) -> None:
        pass


@pytest.fixture
def dispatcher() -> Dispatcher:
    dispatcher = Dispatcher(FakePool(2))
    dispatcher.start()
    deadline = time.monotonic() + 10
    while any(slot.state != "ready" for slot in dispatcher.slots):
        assert time.monotonic() < deadline, dispatcher.status()
        time.sleep(0.01)
    return dispatcher


def test_each_worker_becomes_ready_once_it_reports(dispatcher: Dispatcher) -> None:
    assert [w["label"] for w in dispatcher.status()] == ["worker 0 (fake)", "worker 1 (fake)"]


def test_a_taken_slot_sends_the_next_prompt_elsewhere(dispatcher: Dispatcher) -> None:
    first = dispatcher.acquire(NO_NEEDS, "a")
    second = dispatcher.acquire(NO_NEEDS, "b")
    assert first is not None and second is not None and first.index != second.index
    assert dispatcher.acquire(NO_NEEDS, "c") is None
    assert not dispatcher.wait_for_room(0.01)


def test_a_finished_run_frees_its_slot_and_is_listed(dispatcher: Dispatcher) -> None:
    slot = dispatcher.acquire(NO_NEEDS, "a")
    assert slot is not None
    dispatcher.run(slot, Job("a", {}, [], {}), lambda batch: None)
    assert dispatcher.status()[slot.index]["recent_prompts"] == ["a"]
    assert dispatcher.status()[slot.index]["running"] == []


def test_an_interrupt_reaches_the_worker_running_the_prompt(dispatcher: Dispatcher) -> None:
    dispatcher.acquire(NO_NEEDS, "a")
    slot = dispatcher.acquire(NO_NEEDS, "b")
    assert slot is not None
    assert dispatcher.interrupt("b") == ["b"]
    assert dispatcher.pool.interrupted == [(slot.index, "b")]  # type: ignore[attr-defined]


def test_a_prompt_is_given_up_after_two_workers_died_running_it(
        dispatcher: Dispatcher) -> None:
    first = dispatcher.acquire(NO_NEEDS, "p")
    assert first is not None
    assert dispatcher.gave_up("p", dispatcher.lost(first, "p")) is None
    second = dispatcher.slots[1 - first.index]
    reason = dispatcher.gave_up("p", dispatcher.lost(second, "p"))
    assert reason is not None and "worker 0 (fake)" in reason and "worker 1 (fake)" in reason
    assert "not tried a third time" in reason


def test_an_idle_worker_found_dead_is_restarted(dispatcher: Dispatcher) -> None:
    dispatcher.pool.dead.add(1)  # type: ignore[attr-defined]
    lost = dispatcher.check_health()
    assert [slot.index for slot in lost] == [1]
    assert dispatcher.slots[1].restarts == 1
