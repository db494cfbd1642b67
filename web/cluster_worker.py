"""`--ray`: the server's queue drained by worker actors instead of the in-process executor.

It keeps the single-process Worker's contract (what the routes and WebSocket call) and adds
what a cluster needs: a dispatcher thread hands each queued prompt to the best worker with a
free slot (model affinity, see engine/cluster/scheduler.py); one thread per running prompt
replays its events to the submitting client, lands its output files in the server's folders
and records its history; a prompt whose worker dies goes back to the front of the queue, and
fails once it has been running on two workers that died."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from engine.cluster.affinity import prompt_needs
from engine.cluster.dispatcher import Dispatcher, WorkerSlot
from engine.cluster.protocol import Batch, Job, Outcome, WorkerLost
from engine.cluster.relay import replay
from engine.cluster.runtime import error_payload
from engine.cluster.shipping import FileLanding, input_files
from engine.executor import ExecutionResult
from engine.graph import Prompt
from web.history import HistoryRecord
from web.listener import SocketListener
from web.queue import QueueItem
from web.worker import Worker

if TYPE_CHECKING:
    from web.server import LoomServer

logger = logging.getLogger("loom.web.cluster")

POLL_S = 1.0
HEALTH_EVERY_S = 5.0
CONNECT_RETRY_S = 5.0


class ClusterWorker(Worker):
    """Runs the queue on Ray worker actors."""

    def __init__(self, server: LoomServer, dispatcher: Dispatcher, address: str) -> None:
        super().__init__(server)
        self.dispatcher = dispatcher
        self.address = address
        self.landing = FileLanding(server.services.paths)
        self._listeners: dict[str, SocketListener] = {}
        self._runs: list[threading.Thread] = []
        self._connected = threading.Event()
        self._stop_deadline = 0.0

    # -- lifetime ---------------------------------------------------------------------------
    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="loom-dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Interrupt the running prompts (they run first after a restart) and end the
        dispatcher thread, which ends the workers; False if that took over `timeout` s."""
        self._stopping.set()
        self._stop_deadline = time.monotonic() + timeout
        if self._connected.is_set():
            self.dispatcher.interrupt(None)
        self.server.queue.wake()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _connect(self) -> bool:
        """Start the workers; retried until the cluster answers (it may be down or starting)."""
        while not self._stopping.is_set():
            try:
                self.dispatcher.start()
            except (ConnectionError, RuntimeError, ValueError) as exc:
                logger.error("cannot reach the Ray cluster at %s (%s); retrying in %.0f s",
                             self.address, exc, CONNECT_RETRY_S)
                self._stopping.wait(CONNECT_RETRY_S)
                continue
            self._connected.set()
            return True
        return False

    # -- requests from the HTTP side ---------------------------------------------------------
    @property
    def running_prompt_id(self) -> str | None:
        running = self.running_prompt_ids
        return running[0] if running else None

    @property
    def running_prompt_ids(self) -> list[str]:
        return sorted(self._listeners)

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Interrupt `prompt_id` on the worker running it (every running prompt when None)."""
        reached = self.dispatcher.interrupt(prompt_id) if self._connected.is_set() else []
        if prompt_id is not None and not reached:
            logger.info("interrupt for %s ignored: it is not running", prompt_id)
        return bool(reached)

    def request_free(self, unload_models: bool, free_memory: bool) -> None:
        if (unload_models or free_memory) and self._connected.is_set():
            self.dispatcher.free(unload_models, free_memory)

    def greet(self, sid: str) -> None:
        for listener in list(self._listeners.values()):
            if listener.client_id == sid and listener.current is not None:
                self.server.sockets.send("executing", listener.current, sid)

    def cluster_status(self) -> dict[str, Any]:
        return {"address": self.address, "connected": self._connected.is_set(),
                "workers": self.dispatcher.status()}

    # -- the dispatcher thread ----------------------------------------------------------------
    def _loop(self) -> None:
        """Dispatch until stopped. This thread also starts and stops Ray: a Ray runtime
        started from a thread that has ended leaves its agent processes behind."""
        if not self._connect():
            return
        try:
            self._dispatch_until_stopped()
        finally:
            for thread in self._runs:
                thread.join(max(self._stop_deadline - time.monotonic(), 0))
            self.dispatcher.stop()
        logger.info("cluster dispatcher stopped")

    def _dispatch_until_stopped(self) -> None:
        last_check = time.monotonic()
        while not self._stopping.is_set():
            try:
                if time.monotonic() - last_check > HEALTH_EVERY_S:
                    self._check_health()
                    last_check = time.monotonic()
                if not self.dispatcher.wait_for_room(POLL_S):
                    continue
                item = self.server.queue.take(timeout=POLL_S)
                if item is not None and not self._stopping.is_set():
                    self._dispatch(item)
            except Exception:  # noqa: BLE001 - the dispatcher must outlive any one failure
                logger.exception("the cluster dispatcher hit an error; it carries on")
                time.sleep(POLL_S)

    def _check_health(self) -> None:
        for slot in self.dispatcher.check_health():
            logger.warning("%s died while idle; Ray restarts it", slot.label)
            self.landing.forget(slot.index)

    def _dispatch(self, item: QueueItem) -> None:
        prepared = self._prepared_prompt(item)
        if isinstance(prepared, ExecutionResult):
            self._record_failure(item, prepared.error or {})
            return
        prompt, outputs = prepared
        slot = self.dispatcher.acquire(prompt_needs(prompt, self.server.registry),
                                       item.prompt_id)
        if slot is None:  # the worker that had room died in between
            self._put_back(item, prompt, outputs)
            return
        job = Job(item.prompt_id, item.prompt, outputs, item.extra_data,
                  input_files(prompt, self.server.services.paths),
                  previews=self.server.args.preview_method != "none")
        thread = threading.Thread(target=self._run_on, args=(slot, item, job, prompt),
                                  name=f"loom-run-{item.prompt_id[:8]}", daemon=True)
        self._runs = [t for t in self._runs if t.is_alive()] + [thread]
        thread.start()

    def _put_back(self, item: QueueItem, prompt: Prompt, outputs: list[str]) -> None:
        self.remember(item.prompt_id, prompt, outputs)
        self.server.queue.requeue(item.prompt_id)

    # -- one running prompt ------------------------------------------------------------------
    def _run_on(self, slot: WorkerSlot, item: QueueItem, job: Job, prompt: Prompt) -> None:
        listener = SocketListener(self.server.sockets, item.prompt_id, item.client_id,
                                  previews=job.previews)
        self._listeners[item.prompt_id] = listener
        try:
            outcome = self.dispatcher.run(slot, job, lambda batch: self._replay(
                slot.index, batch, listener, item.prompt_id))
        except WorkerLost as lost:
            self._worker_lost(slot, item, job, prompt, lost)
            return
        except Exception as exc:  # noqa: BLE001 - the prompt fails, the server carries on
            logger.exception("prompt %s failed on %s outside any node", item.prompt_id,
                             slot.label)
            self._record_failure(item, error_payload(item.prompt_id, f"{slot.label}: {exc}",
                                                     type(exc).__name__))
            return
        finally:
            self._listeners.pop(item.prompt_id, None)
        self._finish(slot, item, listener, outcome)

    def _replay(self, worker: int, batch: Batch, listener: SocketListener,
                prompt_id: str) -> None:
        self.landing.land(worker, batch.files)
        replay(batch, listener, prompt_id, lambda ui: self.landing.rename(worker, ui))

    def _finish(self, slot: WorkerSlot, item: QueueItem, listener: SocketListener,
                outcome: Outcome) -> None:
        listener.finish()
        if self._stopping.is_set() and outcome.status == "interrupted":
            logger.info("prompt %s was cut off by shutdown; it runs first after a restart",
                        item.prompt_id)
            return
        outputs = {node_id: self.landing.rename(slot.index, ui)
                   for node_id, ui in outcome.outputs.items()}
        record = HistoryRecord.build(item.to_json(), outputs,
                                     "success" if outcome.ok else "error", listener.messages,
                                     listener.timings)
        self.server.queue.finish(item.prompt_id, record)
        self.dispatcher.finished(item.prompt_id)
        listener.send_end_marker()

    def _worker_lost(self, slot: WorkerSlot, item: QueueItem, job: Job, prompt: Prompt,
                     lost: WorkerLost) -> None:
        deaths = self.dispatcher.lost(slot, item.prompt_id)
        self.landing.forget(slot.index)
        if self._stopping.is_set():
            return  # still marked running: it runs first after a restart
        reason = self.dispatcher.gave_up(item.prompt_id, deaths)
        if reason is not None:
            logger.error("%s", reason)
            self._record_failure(item, error_payload(item.prompt_id, reason, "WorkerLost"))
            return
        logger.warning("%s died while running prompt %s (%s); the prompt goes back to the "
                       "front of the queue", lost.label, item.prompt_id, lost.reason)
        self._put_back(item, prompt, job.outputs)

    def _record_failure(self, item: QueueItem, error: dict[str, Any]) -> None:
        """A prompt that failed outside any worker's run: its error event and history entry."""
        listener = SocketListener(self.server.sockets, item.prompt_id, item.client_id)
        self._report(listener, ExecutionResult(item.prompt_id, "error", error=error))
        record = HistoryRecord.build(item.to_json(), {}, "error", listener.messages,
                                     listener.timings)
        self.server.queue.finish(item.prompt_id, record)
        listener.send_end_marker()
