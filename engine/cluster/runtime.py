"""The body of one worker actor, free of Ray so it can be tested in process: it builds its own
Loom (registry with built-in and custom nodes, model manager, executors with their output
caches) from the server's flags, runs jobs, and hands their events and output files back to the
server's polls (plain calls, which Ray Client supports, unlike streaming generators).

Input, output and temp folders are private staging folders of the worker; models and custom
nodes come from the worker machine's own base directory (`LOOM_BASE_DIRECTORY` in the worker's
environment, else the server's --base-directory path) and extra_model_paths.yaml files."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import queue
import shutil
import socket
import tempfile
import threading
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.cache import OutputCache
from engine.cluster.affinity import (
    available_model_files,
    loaded_model_files,
    model_files,
    structural_keys,
)
from engine.cluster.protocol import Batch, Job, Outcome, WorkerReport
from engine.cluster.relay import RelayListener, labelled
from engine.cluster.shipping import OutputCollector, stage_inputs
from engine.events import timestamp_ms
from engine.executor import Executor
from engine.graph import GraphPlanner, Prompt
from engine.validation import validate_prompt

APP_FACTORY = "main:build_app"  # module:function building (registry, services, executor)
BASE_ENV = "LOOM_BASE_DIRECTORY"
RECENT_PROMPTS = 8  # prompts whose node keys a non-classic cache may still hold
STAGING_PREFIX = "loom-worker-"  # + pid: the staging folder of a worker process


def resolve_factory(name: str) -> Callable[[argparse.Namespace], Any]:
    """`module:function` imported on this worker."""
    module_name, _, attribute = name.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(f"this worker cannot import the app factory {name!r} ({exc}); "
                           f"install Loom on every Ray node (pip install loom[ray])") from exc


def worker_namespace(args: argparse.Namespace, staging: Path) -> argparse.Namespace:
    """The server's flags as this worker uses them: private staging folders for input, output,
    temp and user files; models from this machine's base directory."""
    values = dict(vars(args))
    for name in ("output", "input", "temp", "user"):
        values[f"{name}_directory"] = staging / name
    if os.environ.get(BASE_ENV):
        values["base_directory"] = Path(os.environ[BASE_ENV])
    return argparse.Namespace(**values)


class WorkerRuntime:
    """One worker: `capacity` executors (one prompt each at a time) sharing a model manager."""

    def __init__(self, index: int, args: argparse.Namespace, *, capacity: int = 1,
                 factory: str = APP_FACTORY) -> None:
        self.index = index
        self.host, self.pid = socket.gethostname(), os.getpid()
        remove_stale_staging(Path(tempfile.gettempdir()))
        self.staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{self.pid}-"))
        app = resolve_factory(factory)(worker_namespace(args, self.staging))
        self.registry, self.services = app.registry, app.services
        self.capacity = capacity
        self.executors = [app.executor, *(self._another_executor(app.executor)
                                          for _ in range(capacity - 1))]
        self.idle: queue.SimpleQueue[Executor] = queue.SimpleQueue()
        for executor in self.executors:
            self.idle.put(executor)
        self.collector = OutputCollector(self.services.paths)
        self.label = f"worker {index} ({self.host} pid {self.pid})"
        self.running: dict[str, Executor] = {}
        self._streams: dict[str, queue.Queue[Any]] = {}
        self.cancelled: set[str] = set()
        keep = 1 if app.executor.cache.policy == "classic" else RECENT_PROMPTS
        self.recent: deque[frozenset[str]] = deque(maxlen=keep * capacity)
        self.prompts_run = 0
        self._lock = threading.Lock()
        self._free_request: tuple[bool, bool] | None = None

    def _another_executor(self, first: Executor) -> Executor:
        cache = first.cache
        twin = OutputCache(cache.policy, max_entries=cache.max_entries, max_bytes=cache.max_bytes)
        services = dataclasses.replace(self.services, graph_planner=GraphPlanner())
        return Executor(first.registry, services, twin)

    # -- running a job ---------------------------------------------------------------------
    def start(self, job: Job) -> None:
        """Start running `job`; its events and outcome are then read with `poll`."""
        stream: queue.Queue[Any] = queue.Queue()
        with self._lock:
            if job.prompt_id in self._streams:
                raise ValueError(f"prompt {job.prompt_id} is already running on {self.label}; "
                                 f"give each job its own prompt id")
            self._streams[job.prompt_id] = stream
        threading.Thread(target=self._execute, args=(job, stream), daemon=True,
                         name=f"loom-job-{job.prompt_id[:8]}").start()

    def poll(self, prompt_id: str, timeout: float) -> list[Batch | Outcome]:
        """What job `prompt_id` did since the last poll: a Batch of its listener calls (waits up
        to `timeout` seconds for the first), then its Outcome once it is over."""
        with self._lock:
            stream = self._streams.get(prompt_id)
        if stream is None:
            raise UnknownJob(f"{self.label} runs no prompt {prompt_id} (it restarted since, or "
                             f"the prompt was never started here)")
        try:
            items = [stream.get(timeout=timeout)]
        except queue.Empty:
            return []
        while not isinstance(items[-1], Outcome):
            try:
                items.append(stream.get_nowait())
            except queue.Empty:
                break
        if isinstance(items[-1], Outcome):
            with self._lock:
                self._streams.pop(prompt_id, None)
        return merged(items)

    def _execute(self, job: Job, stream: queue.Queue[Any]) -> None:
        executor = self.idle.get()
        with self._lock:
            self.running[job.prompt_id] = executor
        listener = RelayListener(stream, self.collector.collect, self.label,
                                 previews=job.previews,
                                 on_start=lambda: self._interrupt_if_cancelled(job, executor))
        try:
            outcome = self._run_job(job, executor, listener)
        except Exception as exc:  # noqa: BLE001 - reported to the server as the prompt's error
            outcome = self._failure(job, listener, exc)
        finally:
            with self._lock:
                self.running.pop(job.prompt_id, None)
                self.cancelled.discard(job.prompt_id)
            self.idle.put(executor)
        outcome.report = self.report()
        stream.put(outcome)

    def _interrupt_if_cancelled(self, job: Job, executor: Executor) -> None:
        """An interrupt that came before the executor cleared its flag still counts."""
        with self._lock:
            if job.prompt_id in self.cancelled:
                executor.interrupt.set()

    def _run_job(self, job: Job, executor: Executor, listener: RelayListener) -> Outcome:
        self._apply_free_request(executor)
        stage_inputs(job.inputs, self.services.paths)
        checked = validate_prompt(job.prompt, self.registry, executor.services,
                                  targets=job.outputs)
        if checked.error is not None or not checked.outputs:
            return self._invalid(job, listener, checked.to_json())
        result = executor.execute(checked.prompt, checked.outputs, prompt_id=job.prompt_id,
                                  extra_data=job.extra_data, listener=listener)
        needed = checked.prompt.required_nodes(checked.outputs)
        keys = structural_keys(checked.prompt)
        self.recent.append(frozenset(keys[node_id] for node_id in needed))
        self.prompts_run += 1
        error = labelled(result.error, self.label) if result.status == "error" else result.error
        return Outcome(job.prompt_id, result.status, result.outputs, error, result.executed,
                       result.cached, result.timings)

    def _invalid(self, job: Job, listener: RelayListener, problem: dict[str, Any]) -> Outcome:
        """The prompt does not validate here (a model missing on this machine, a custom node
        not installed): an execution_error naming this worker and every problem."""
        error = problem.get("error") or {}
        message = (f"the prompt does not validate on this worker: {error.get('message', '')} "
                   f"{error.get('details', '')}{self._missing_models(job)}; put the missing "
                   f"files or custom nodes on this machine (its own models folders or "
                   f"extra_model_paths.yaml)")
        return self._fail(job, listener, message, "WorkerValidationError",
                          node_errors=problem.get("node_errors", {}))

    def _missing_models(self, job: Job) -> str:
        """"; missing here: checkpoints/x.safetensors (looked in /models/checkpoints)"."""
        paths = self.services.paths
        wanted = model_files(Prompt.parse(job.prompt), self.registry)
        missing = sorted((kind, name) for kind, name in wanted
                         if name not in paths.list_files(kind))
        shown = [f"{kind}/{name} (looked in {', '.join(map(str, paths.folder_dirs(kind)))})"
                 for kind, name in missing]
        return f"; missing here: {'; '.join(shown)}" if shown else ""

    def _failure(self, job: Job, listener: RelayListener, exc: Exception) -> Outcome:
        """A failure outside any node (a bug, a full disk): the prompt's error, not the actor's."""
        return self._fail(job, listener, str(exc), type(exc).__name__,
                          traceback=traceback.format_exception(type(exc), exc, exc.__traceback__))

    def _fail(self, job: Job, listener: RelayListener, message: str, exception_type: str,
              **extra: Any) -> Outcome:
        payload = {**error_payload(job.prompt_id, message, exception_type), **extra}
        if not listener.started:
            listener.event("execution_start", {"prompt_id": job.prompt_id,
                                               "timestamp": payload["timestamp"]})
        listener.event("execution_error", payload)
        return Outcome(job.prompt_id, "error", {}, labelled(payload, self.label), [], [], {})

    # -- requests from the server ----------------------------------------------------------
    def interrupt(self, prompt_id: str | None = None) -> list[str]:
        """Interrupt `prompt_id` (every running prompt when None); returns the running ones
        reached. A named prompt whose start has not arrived yet (calls to a threaded actor are
        not ordered) is stopped as soon as it starts."""
        with self._lock:
            if prompt_id is not None:
                self.cancelled.add(prompt_id)
            targets = [p for p in self.running if prompt_id is None or p == prompt_id]
            for target in targets:
                self.cancelled.add(target)
                self.running[target].interrupt.set()
        return targets

    def free(self, unload_models: bool, free_memory: bool) -> None:
        """POST /free: done before this worker's next prompt (the caches belong to the runs)."""
        with self._lock:
            previous = self._free_request or (False, False)
            self._free_request = (previous[0] or unload_models, previous[1] or free_memory)

    def _apply_free_request(self, current: Executor) -> None:
        """Unload models, and drop the cached outputs of `current` (about to run) and of every
        executor not running."""
        with self._lock:
            request, self._free_request = self._free_request, None
            busy = {id(executor) for executor in self.running.values()} - {id(current)}
        if request is None:
            return
        if request[1]:
            for executor in self.executors:
                if id(executor) not in busy:
                    executor.cache.clear()
            self.recent.clear()
        manager = self.services.model_manager
        if hasattr(manager, "free"):
            manager.free()

    def report(self) -> WorkerReport:
        """What this worker holds and runs now."""
        manager = self.services.model_manager
        policy = getattr(manager, "policy", None)
        with self._lock:
            running = list(self.running)
        paths = self.services.paths
        return WorkerReport(
            self.label, self.host, self.pid, policy.describe() if policy is not None else "",
            len(self.registry), self.capacity, running, loaded_model_files(manager, paths),
            available_model_files(paths), frozenset().union(*self.recent), self.prompts_run,
            manager.stats() if hasattr(manager, "stats") else None)


def remove_stale_staging(temp: Path) -> None:
    """Delete the staging folders of worker processes that are gone (killed workers cannot
    clean up after themselves)."""
    for folder in temp.glob(f"{STAGING_PREFIX}*-*"):
        pid = folder.name[len(STAGING_PREFIX):].split("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class UnknownJob(KeyError):
    """A poll for a prompt this worker is not running (typically: it restarted since)."""


def merged(items: list[Any]) -> list[Batch | Outcome]:
    """Stream items, (call, files) pairs and a final Outcome, as one Batch (and the Outcome)."""
    calls = [item for item in items if not isinstance(item, Outcome)]
    batch = Batch([call for call, _ in calls], [f for _, files in calls for f in files])
    ending = [item for item in items if isinstance(item, Outcome)]
    return ([batch] if calls else []) + ending


def error_payload(prompt_id: str, message: str, exception_type: str) -> dict[str, Any]:
    """An execution_error payload for a failure that belongs to no node."""
    return {"prompt_id": prompt_id, "node_id": None, "node_type": None, "executed": [],
            "exception_message": message, "exception_type": exception_type, "traceback": [],
            "current_inputs": {}, "current_outputs": [], "timestamp": timestamp_ms()}
