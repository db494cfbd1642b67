"""The execution worker: one thread that runs queued prompts one at a time, streams their events
to the submitting client and records their history. A failing node fails its prompt; a failure in
the worker itself is logged and the next prompt still runs."""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from engine.events import timestamp_ms
from engine.executor import ExecutionResult
from engine.graph import Prompt
from engine.validation import validate_prompt
from web.history import HistoryRecord
from web.listener import SocketListener
from web.queue import QueueItem
from web.resume import Resume

if TYPE_CHECKING:
    from web.server import LoomServer

logger = logging.getLogger("loom.web.worker")

POLL_S = 1.0  # how often an idle worker looks at stop and free requests


class Worker:
    """Runs the queue on a background thread."""

    def __init__(self, server: LoomServer) -> None:
        self.server = server
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._prepared: dict[str, tuple[Prompt, list[str]]] = {}
        self._running: SocketListener | None = None
        self._free_request: tuple[bool, bool] | None = None

    # -- lifetime ---------------------------------------------------------------------------
    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="loom-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Interrupt the running prompt (it runs again first after a restart) and end the thread;
        False if it did not end within `timeout` seconds."""
        self._stopping.set()
        self.server.executor.interrupt.set()
        self.server.queue.wake()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- requests from the HTTP side -------------------------------------------------------------
    def remember(self, prompt_id: str, prompt: Prompt, outputs: list[str]) -> None:
        """The validated prompt of a queued id, so it is not validated twice."""
        with self._lock:
            self._prepared[prompt_id] = (prompt, outputs)

    def forget(self, prompt_ids: Iterable[str]) -> None:
        with self._lock:
            for prompt_id in prompt_ids:
                self._prepared.pop(prompt_id, None)

    @property
    def running_prompt_id(self) -> str | None:
        running = self._running
        return running.prompt_id if running is not None else None

    @property
    def running_prompt_ids(self) -> list[str]:
        running = self.running_prompt_id
        return [running] if running is not None else []

    def cluster_status(self) -> dict[str, Any] | None:
        """The workers of a --ray server (see web/cluster_worker.py); None in one process."""
        return None

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Interrupt the running prompt (only if it is `prompt_id`, when given)."""
        running = self.running_prompt_id
        if prompt_id is not None and prompt_id != running:
            logger.info("interrupt for %s ignored: %s is running", prompt_id, running)
            return False
        self.server.executor.interrupt.set()
        return True

    def request_free(self, unload_models: bool, free_memory: bool) -> None:
        """Before the next prompt, unload models and (`free_memory`) drop cached outputs too;
        done on the worker thread, which owns the cache."""
        if not (unload_models or free_memory):
            return
        with self._lock:
            previous = self._free_request or (False, False)
            self._free_request = (previous[0] or unload_models, previous[1] or free_memory)
        self.server.queue.wake()

    def greet(self, sid: str) -> None:
        """Tell a (re)connecting client which of its nodes is running, if any."""
        running = self._running
        if running is not None and running.client_id == sid and running.current is not None:
            self.server.sockets.send("executing", running.current, sid)

    # -- the thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                item = self.server.queue.take(timeout=POLL_S)
                self._apply_free_request()
                if item is not None and not self._stopping.is_set():
                    self._run(item)
            except Exception:  # noqa: BLE001 - the worker must outlive any one failure
                logger.exception("the execution worker hit an error; it carries on")
                time.sleep(POLL_S)
        logger.info("execution worker stopped")

    def _apply_free_request(self) -> None:
        with self._lock:
            request, self._free_request = self._free_request, None
        if request is None:
            return
        unload_models, free_memory = request
        if free_memory:
            self.server.executor.cache.clear()
        manager = self.server.services.model_manager
        if hasattr(manager, "free"):
            manager.free()
        logger.info("freed loaded models%s", " and cached outputs" if free_memory else "")

    def _run(self, item: QueueItem) -> None:
        listener = SocketListener(self.server.sockets, item.prompt_id, item.client_id,
                                  previews=self.server.args.preview_method != "none")
        self._running = listener
        if self.server.pack_server is not None:  # server.PromptServer.instance.client_id
            self.server.pack_server.client_id = item.client_id
        try:
            result = self._execute(item, listener, Resume(self.server.queue, item.prompt_id))
        finally:
            self._running = None
        listener.finish()
        if self._stopping.is_set() and result.status == "interrupted":
            logger.info("prompt %s was cut off by shutdown; it runs first after a restart",
                        item.prompt_id)
            return
        status_str = "success" if result.ok else "error"
        record = HistoryRecord.build(item.to_json(), result.outputs, status_str,
                                     listener.messages, listener.timings, item.parts(),
                                     listener.states.lineage)
        self.server.queue.finish(item.prompt_id, record)
        listener.send_end_marker()

    def _execute(self, item: QueueItem, listener: SocketListener,
                 resume: Resume) -> ExecutionResult:
        """Run the item (keeping what a cut-off run of it saved); an exception outside any node
        (a bug) becomes an execution_error."""
        try:
            prepared = self._prepared_prompt(item)
            if isinstance(prepared, ExecutionResult):
                self._report(listener, prepared)
                return prepared
            prompt, outputs = prepared
            result = self.server.executor.execute(prompt, resume.targets(prompt, outputs),
                                                  prompt_id=item.prompt_id,
                                                  extra_data=item.extra_data,
                                                  listener=resume.listener(listener))
            return resume.merge(result)
        except Exception as exc:  # noqa: BLE001 - reported to the client and history, logged
            logger.exception("prompt %s failed outside any node", item.prompt_id)
            result = failed_result(item.prompt_id, exc)
            self._report(listener, result)
            return result

    @staticmethod
    def _report(listener: SocketListener, result: ExecutionResult) -> None:
        assert result.error is not None
        if not any(name == "execution_start" for name, _ in listener.messages):
            listener.event("execution_start", {"prompt_id": result.prompt_id,
                                               "timestamp": result.error["timestamp"]})
        listener.event("execution_error", result.error)

    def _prepared_prompt(self, item: QueueItem) -> tuple[Prompt, list[str]] | ExecutionResult:
        """The validated prompt: kept from POST /prompt, or (after a restart) validated now."""
        with self._lock:
            prepared = self._prepared.pop(item.prompt_id, None)
        if prepared is not None:
            return prepared
        result = validate_prompt(item.prompt, self.server.registry, self.server.services,
                                 targets=item.outputs)
        if result.error is None and result.outputs:
            return result.prompt, result.outputs
        problem = result.error or {"message": "none of its outputs is valid any more",
                                   "details": ""}
        message = (f"the prompt no longer validates: {problem['message']} "
                   f"{problem.get('details', '')}").strip()
        failure = failed_result(item.prompt_id, RuntimeError(message))
        assert failure.error is not None
        failure.error["node_errors"] = result.node_errors
        return failure


def failed_result(prompt_id: str, exc: BaseException) -> ExecutionResult:
    """An error result for a failure that belongs to no node."""
    payload: dict[str, Any] = {
        "prompt_id": prompt_id, "node_id": None, "node_type": None, "executed": [],
        "exception_message": str(exc), "exception_type": type(exc).__name__,
        "traceback": traceback.format_exception(type(exc), exc, exc.__traceback__),
        "current_inputs": {}, "current_outputs": [], "timestamp": timestamp_ms()}
    return ExecutionResult(prompt_id, "error", error=payload)
