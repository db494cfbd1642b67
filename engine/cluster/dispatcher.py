"""The state of each worker (starting, ready, restarting, failed), its free slots and what it
reported, and the choice of worker for a prompt. Shared by the server's ClusterWorker and the
command line's batch runs; thread-safe; talks to the workers through a WorkerPool."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.cluster.affinity import PromptNeeds
from engine.cluster.protocol import Batch, Job, Outcome, WorkerFailed, WorkerReport
from engine.cluster.scheduler import WorkerView, choose_worker

logger = logging.getLogger("loom.cluster")

READY_POLL_S = 2.0  # how long one wait for a (re)starting worker blocks before checking stop
HEALTH_TIMEOUT_S = 5.0
MAX_WORKER_DEATHS = 2  # a prompt running on this many workers that died fails instead
RECENT_SHOWN = 16  # finished prompt ids each worker lists in /queue and /system_stats


class Pool(Protocol):
    """What the dispatcher needs of a WorkerPool (tests pass a fake)."""

    size: int

    def start(self) -> None: ...
    def wait_ready(self, index: int, timeout: float | None = None) -> WorkerReport | None: ...
    def reports(self, indices: list[int], timeout: float,
                ) -> tuple[dict[int, WorkerReport], set[int]]: ...
    def run(self, index: int, job: Job, label: str,
            on_batch: Callable[[Batch], None]) -> Outcome: ...
    def interrupt(self, index: int, prompt_id: str | None) -> None: ...
    def free(self, unload_models: bool, free_memory: bool) -> None: ...
    def shutdown(self) -> None: ...


@dataclass
class WorkerSlot:
    """One worker as the dispatcher sees it."""

    index: int
    state: str = "starting"  # starting | ready | restarting | failed
    view: WorkerView | None = None
    running: set[str] = field(default_factory=set)
    finished: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT_SHOWN))
    restarts: int = 0
    error: str | None = None

    @property
    def label(self) -> str:
        return self.view.report.label if self.view is not None else f"worker {self.index}"

    def to_json(self) -> dict[str, Any]:
        shown = self.view.report.to_json() if self.view is not None else {"label": self.label}
        return {"index": self.index, "state": self.state, **shown,
                "running": sorted(self.running), "recent_prompts": list(self.finished),
                "restarts": self.restarts, "error": self.error}


class Dispatcher:
    """Hands prompts to workers and keeps track of them."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.slots = [WorkerSlot(index) for index in range(pool.size)]
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._deaths: dict[str, list[str]] = {}  # prompt id -> workers that died running it

    # -- lifetime ---------------------------------------------------------------------------
    def start(self) -> None:
        """Create the workers; each becomes ready on its own as soon as it has started."""
        self.pool.start()
        for slot in self.slots:
            self._await_ready(slot, "starting")

    def stop(self) -> None:
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        self.pool.shutdown()

    def _await_ready(self, slot: WorkerSlot, state: str) -> None:
        with self._changed:
            slot.state = state
        threading.Thread(target=self._wait_until_ready, args=(slot,), daemon=True,
                         name=f"loom-worker-{slot.index}-ready").start()

    def _wait_until_ready(self, slot: WorkerSlot) -> None:
        while not self._stopping.is_set():
            try:
                report = self.pool.wait_ready(slot.index, timeout=READY_POLL_S)
            except WorkerFailed as exc:
                if self.stopping:
                    return  # killed by our own shutdown
                logger.error("%s", exc)
                with self._changed:
                    slot.state, slot.error = "failed", str(exc)
                    self._changed.notify_all()
                return
            if report is not None:
                logger.debug("%s is ready", report.label)
                with self._changed:
                    slot.state, slot.error = "ready", None
                    slot.view = WorkerView(slot.index, report)
                    self._changed.notify_all()
                return

    # -- choosing and running ---------------------------------------------------------------
    def wait_for_room(self, timeout: float) -> bool:
        """Whether some worker has a free slot (waits up to `timeout` seconds for one)."""
        with self._changed:
            return self._changed.wait_for(self._has_room, timeout) and not self.stopping

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _has_room(self) -> bool:
        return self.stopping or any(self._free_view(slot) for slot in self.slots)

    def _free_view(self, slot: WorkerSlot) -> WorkerView | None:
        if slot.state != "ready" or slot.view is None:
            return None
        slot.view.running = len(slot.running)
        return slot.view if slot.view.has_room else None

    def acquire(self, needs: PromptNeeds, prompt_id: str) -> WorkerSlot | None:
        """The best worker with a free slot, now counted as running `prompt_id`; None if all
        are busy or down."""
        with self._changed:
            views = [view for slot in self.slots if (view := self._free_view(slot)) is not None]
            chosen = choose_worker(needs, views)
            if chosen is None:
                return None
            slot = self.slots[chosen.index]
            slot.running.add(prompt_id)
            return slot

    def run(self, slot: WorkerSlot, job: Job, on_batch: Callable[[Batch], None]) -> Outcome:
        """Run `job` on `slot`'s worker; the slot is released when it ends. A WorkerLost is
        re-raised after the worker is marked restarting."""
        try:
            outcome = self.pool.run(slot.index, job, slot.label, on_batch)
        except BaseException:
            self._release(slot, job.prompt_id, None)
            raise
        self._release(slot, job.prompt_id, outcome.report)
        return outcome

    def _release(self, slot: WorkerSlot, prompt_id: str, report: WorkerReport | None) -> None:
        with self._changed:
            slot.running.discard(prompt_id)
            if report is not None:
                slot.finished.append(prompt_id)
            self._changed.notify_all()
        if report is not None:
            self._update(slot, report)

    def _update(self, slot: WorkerSlot, report: WorkerReport) -> None:
        with self._changed:
            if slot.state == "ready":
                slot.view = WorkerView(slot.index, report)

    def lost(self, slot: WorkerSlot, prompt_id: str | None = None) -> list[str]:
        """The worker died (running `prompt_id`): no prompt goes to it until Ray has restarted
        it. Returns the labels of every worker that died running `prompt_id` so far."""
        with self._changed:
            deaths = self._deaths.setdefault(prompt_id, []) if prompt_id else []
            deaths.append(slot.label)
            if slot.state == "ready":
                slot.restarts += 1
                slot.running.clear()
                self._await_ready(slot, "restarting")
            return list(deaths)

    def gave_up(self, prompt_id: str, deaths: list[str]) -> str | None:
        """Why `prompt_id` is not tried again after `deaths`, or None while it may be."""
        if len(deaths) < MAX_WORKER_DEATHS:
            return None
        with self._changed:
            self._deaths.pop(prompt_id, None)
        return (f"prompt {prompt_id} was running on {' and then '.join(deaths)} when each of "
                f"them died (process killed or machine lost); it is not tried a third time. "
                f"Check those workers' logs (out of memory?) and queue it again once the cause "
                f"is fixed")

    def finished(self, prompt_id: str) -> None:
        """`prompt_id` ended (its earlier worker deaths no longer count)."""
        with self._changed:
            self._deaths.pop(prompt_id, None)

    def check_health(self) -> list[WorkerSlot]:
        """Ask idle ready workers for a report; those found dead are marked restarting."""
        with self._changed:
            idle = [slot for slot in self.slots if slot.state == "ready" and not slot.running]
        if not idle:
            return []
        reports, dead = self.pool.reports([slot.index for slot in idle], HEALTH_TIMEOUT_S)
        for slot in idle:
            if slot.index in reports:
                self._update(slot, reports[slot.index])
        lost = [slot for slot in idle if slot.index in dead]
        for slot in lost:
            self.lost(slot)
        return lost

    # -- requests -----------------------------------------------------------------------------
    def running_prompts(self) -> dict[str, WorkerSlot]:
        with self._changed:
            return {prompt_id: slot for slot in self.slots for prompt_id in slot.running}

    def interrupt(self, prompt_id: str | None) -> list[str]:
        """Interrupt `prompt_id` on its worker (every running prompt when None)."""
        targets = {p: slot for p, slot in self.running_prompts().items()
                   if prompt_id is None or p == prompt_id}
        for target, slot in targets.items():
            self.pool.interrupt(slot.index, target)
        return list(targets)

    def free(self, unload_models: bool, free_memory: bool) -> None:
        self.pool.free(unload_models, free_memory)

    def status(self) -> list[dict[str, Any]]:
        """Every worker's state, report and running prompts (for /system_stats and /queue)."""
        with self._changed:
            return [slot.to_json() for slot in self.slots]
