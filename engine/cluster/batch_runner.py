"""`main.py run --ray`: a batch's prompts run across the cluster's workers in parallel, each on
the best free worker; their output files land in this machine's output folders. A prompt whose
worker dies runs once more elsewhere."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from engine.batch import BatchJob, BatchRow, Done, error_text, output_files
from engine.cluster.affinity import prompt_needs
from engine.cluster.dispatcher import Dispatcher, WorkerSlot
from engine.cluster.protocol import Job, WorkerLost
from engine.cluster.shipping import FileLanding, input_files
from engine.paths import Paths
from engine.registry import NodeRegistry

logger = logging.getLogger("loom.cluster.batch")

ROOM_POLL_S = 1.0


class ClusterBatchRunner:
    """Runs a batch on a Dispatcher's workers (started here, stopped at the end)."""

    def __init__(self, dispatcher: Dispatcher, registry: NodeRegistry, paths: Paths) -> None:
        self.dispatcher = dispatcher
        self.registry = registry
        self.paths = paths
        self.landing = FileLanding(paths)
        self._changed = threading.Condition()
        self._pending: deque[BatchJob] = deque()
        self._rows: list[BatchRow] = []

    def run(self, jobs: list[BatchJob], on_done: Done) -> list[BatchRow]:
        self._pending.extend(jobs)
        self.dispatcher.start()
        threads: list[threading.Thread] = []
        try:
            while self._waiting_for(len(jobs)):
                if all(slot.state == "failed" for slot in self.dispatcher.slots):
                    self._fail_pending(on_done)
                elif self.dispatcher.wait_for_room(ROOM_POLL_S):
                    threads.extend(self._start_next(on_done))
            for thread in threads:
                thread.join()
        finally:
            self.dispatcher.stop()
        return self._rows

    def _waiting_for(self, total: int) -> bool:
        """Until every job has a row; while none is pending, wait for a change."""
        with self._changed:
            if not self._pending and len(self._rows) < total:
                self._changed.wait(ROOM_POLL_S)
            return len(self._rows) < total

    def _fail_pending(self, on_done: Done) -> None:
        errors = "; ".join(slot.error or slot.label for slot in self.dispatcher.slots)
        with self._changed:
            pending, self._pending = list(self._pending), deque()
        for job in pending:
            self._done(BatchRow(job, "error", 0.0, "-", error=f"no worker could start: "
                                f"{errors}"), on_done)

    def _start_next(self, on_done: Done) -> list[threading.Thread]:
        """The next pending job started on the best free worker (none if there is none)."""
        with self._changed:
            if not self._pending:
                return []
            job = self._pending[0]
        slot = self.dispatcher.acquire(prompt_needs(job.prompt, self.registry), job_id(job))
        if slot is None:
            return []
        with self._changed:
            self._pending.popleft()
        thread = threading.Thread(target=self._run_one, args=(slot, job, on_done),
                                  daemon=True, name=f"loom-batch-{job.item.index}")
        thread.start()
        return [thread]

    def _run_one(self, slot: WorkerSlot, job: BatchJob, on_done: Done) -> None:
        work = Job(job_id(job), job.prompt.raw, job.outputs, job.extra_data,
                   input_files(job.prompt, self.paths), previews=False)
        started = time.perf_counter()
        try:
            outcome = self.dispatcher.run(
                slot, work, lambda batch: self.landing.land(slot.index, batch.files))
        except WorkerLost as exc:
            self._lost(slot, job, exc, on_done)
            return
        except Exception as exc:  # noqa: BLE001 - this prompt fails, the batch goes on
            logger.exception("%s failed on %s outside any node", job_id(job), slot.label)
            self._done(BatchRow(job, "error", time.perf_counter() - started, slot.label,
                                error=f"{type(exc).__name__}: {exc}"), on_done)
            return
        self.dispatcher.finished(job_id(job))
        outputs = {node: self.landing.rename(slot.index, ui)
                   for node, ui in outcome.outputs.items()}
        self._done(BatchRow(job, outcome.status, time.perf_counter() - started, slot.label,
                            output_files(outputs), error_text(outcome.error)), on_done)

    def _lost(self, slot: WorkerSlot, job: BatchJob, exc: WorkerLost, on_done: Done) -> None:
        deaths = self.dispatcher.lost(slot, job_id(job))
        self.landing.forget(slot.index)
        reason = self.dispatcher.gave_up(job_id(job), deaths)
        if reason is not None:
            self._done(BatchRow(job, "error", 0.0, slot.label, error=reason), on_done)
            return
        logger.warning("%s; %s runs again on another worker", exc, job_id(job))
        with self._changed:
            self._pending.appendleft(job)
            self._changed.notify_all()

    def _done(self, row: BatchRow, on_done: Done) -> None:
        with self._changed:
            self._rows.append(row)
            self._changed.notify_all()
        on_done(row)


def job_id(job: BatchJob) -> str:
    return f"sweep-{job.item.index + 1}"
