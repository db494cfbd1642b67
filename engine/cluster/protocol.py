"""What the server and a worker actor send each other: a Job in, a stream of Batches (the
executor's listener calls, plus the files its output nodes wrote) and one Outcome out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A listener call recorded on the worker and replayed on the server:
# ("event", name, data) | ("finished", node_id, seconds, cached) | ("preview", node_id, image)
Call = tuple[Any, ...]


class WorkerLost(RuntimeError):
    """The worker process died or its machine left the cluster while it ran a prompt."""

    def __init__(self, index: int, label: str, reason: str) -> None:
        super().__init__(f"{label} was lost: {reason}")
        self.index = index
        self.label = label
        self.reason = reason


class WorkerFailed(RuntimeError):
    """A worker that cannot start (or start again): its constructor failed, or Ray gave up."""


@dataclass(frozen=True)
class ShippedFile:
    """A file moved through Ray's object store: `kind` is output, temp or input."""

    kind: str
    subfolder: str
    filename: str
    data: bytes = field(repr=False)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.subfolder, self.filename)


@dataclass
class Job:
    """One prompt for a worker: the API graph (validated again there), the files it reads from
    the server's input folders, and whether the client wants live previews."""

    prompt_id: str
    prompt: dict[str, Any]
    outputs: list[str]
    extra_data: dict[str, Any]
    inputs: list[ShippedFile] = field(default_factory=list)
    previews: bool = True


@dataclass
class Batch:
    """Listener calls in the order the executor made them, and the files written before the
    `executed` events among them."""

    calls: list[Call]
    files: list[ShippedFile] = field(default_factory=list)


@dataclass
class WorkerReport:
    """What a worker holds and does, for scheduling and for /system_stats and /queue."""

    label: str
    host: str
    pid: int
    device: str
    node_types: int
    capacity: int
    running: list[str] = field(default_factory=list)
    loaded_models: list[tuple[str, str]] = field(default_factory=list)  # (folder, name)
    model_files: dict[str, list[str]] = field(default_factory=dict)  # folder -> names
    recent_keys: frozenset[str] = frozenset()  # structural keys of what its caches hold
    prompts_run: int = 0
    models: dict[str, Any] | None = None  # the model manager's stats()

    def to_json(self) -> dict[str, Any]:
        """The report as /system_stats and /queue show it (no key sets)."""
        return {"label": self.label, "host": self.host, "pid": self.pid, "device": self.device,
                "node_types": self.node_types, "capacity": self.capacity,
                "running": list(self.running),
                "loaded_models": [f"{folder}/{name}" for folder, name in self.loaded_models],
                "prompts_run": self.prompts_run, "models": self.models}


@dataclass
class Outcome:
    """How a prompt ended on a worker (values stay there; UI outputs come back)."""

    prompt_id: str
    status: str  # success | error | interrupted
    outputs: dict[str, dict[str, Any]]
    error: dict[str, Any] | None
    executed: list[str]
    cached: list[str]
    timings: dict[str, float]
    report: WorkerReport | None = None  # set by the worker once the run is over

    @property
    def ok(self) -> bool:
        return self.status == "success"
