"""Which worker runs a prompt. Among workers with a free slot: the one that has the prompt's
model files on disk, then the one that has the most of them loaded already (a checkpoint load
costs seconds to minutes), then the one whose cache holds the longest part of the graph, then
the least loaded, then the lowest index."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.cluster.affinity import ModelFile, PromptNeeds
from engine.cluster.protocol import WorkerReport


@dataclass
class WorkerView:
    """The scheduler's picture of one worker."""

    index: int
    report: WorkerReport
    running: int = 0
    ready: bool = True
    available: frozenset[ModelFile] = field(init=False)
    loaded: frozenset[ModelFile] = field(init=False)

    def __post_init__(self) -> None:
        self.available = frozenset((kind, name) for kind, names in
                                   self.report.model_files.items() for name in names)
        self.loaded = frozenset(self.report.loaded_models)

    @property
    def has_room(self) -> bool:
        return self.ready and self.running < self.report.capacity


def rank(needs: PromptNeeds, worker: WorkerView) -> tuple[int, int, int, int, int]:
    """Bigger is better; compared element by element."""
    return (len(needs.models & worker.available), len(needs.models & worker.loaded),
            len(needs.keys & worker.report.recent_keys), -worker.running, -worker.index)


def choose_worker(needs: PromptNeeds, workers: list[WorkerView]) -> WorkerView | None:
    """The best worker with a free slot, or None when every worker is busy or down."""
    free = [worker for worker in workers if worker.has_room]
    return max(free, key=lambda worker: rank(needs, worker)) if free else None
