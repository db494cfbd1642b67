"""The Ray side of the cluster: connecting to (or starting) a Ray runtime, one actor per worker
wrapping a WorkerRuntime, and the calls the dispatcher makes on them. The only module of Loom
that imports Ray (main.py imports it only with --ray)."""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Read by Ray at import: no usage statistics sent over the network (Loom never phones home),
# and no crash handler of Ray's catching SIGTERM ahead of the server's graceful shutdown.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")

import ray  # noqa: E402
from ray.exceptions import (  # noqa: E402
    ActorUnavailableError,
    GetTimeoutError,
    RayActorError,
    RayTaskError,
)

from engine.cluster.protocol import (  # noqa: E402
    Batch,
    Job,
    Outcome,
    WorkerFailed,
    WorkerLost,
    WorkerReport,
)
from engine.cluster.runtime import APP_FACTORY, UnknownJob, WorkerRuntime  # noqa: E402

logger = logging.getLogger("loom.cluster")

NAMESPACE = "loom"
CONTROL_CALLS = 2  # interrupt/report/free calls an actor answers while its slots are busy
POLL_S = 1.0  # longest a poll waits on the worker for a running prompt's next events


@dataclass(frozen=True)
class ClusterConfig:
    """--ray [ADDRESS], --ray-workers, --ray-cpus-per-worker, --ray-gpus-per-worker and
    --ray-prompts-per-worker. An empty address starts a local Ray runtime."""

    address: str
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    prompts_per_worker: int = 1
    factory: str = APP_FACTORY
    log_to_driver: bool = True

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--ray-workers {self.workers}: give at least 1 worker")
        if self.prompts_per_worker < 1:
            raise ValueError(f"--ray-prompts-per-worker {self.prompts_per_worker}: give at "
                             f"least 1")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ValueError(f"--ray-cpus-per-worker {self.cpus_per_worker} / "
                             f"--ray-gpus-per-worker {self.gpus_per_worker}: use 0 or more")

    @classmethod
    def from_args(cls, args: argparse.Namespace, **extra: Any) -> ClusterConfig:
        return cls(args.ray or "", args.ray_workers, args.ray_cpus_per_worker,
                   args.ray_gpus_per_worker, args.ray_prompts_per_worker, **extra)

    @property
    def shown_address(self) -> str:
        return self.address or "a local Ray runtime"


class LoomWorkerActor:
    """A Ray actor around one WorkerRuntime (Ray restarts it after its process dies)."""

    def __init__(self, index: int, args: argparse.Namespace, capacity: int,
                 factory: str) -> None:
        logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False)
                            else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.runtime = WorkerRuntime(index, args, capacity=capacity, factory=factory)

    def start(self, job: Job) -> None:
        self.runtime.start(job)

    def poll(self, prompt_id: str, timeout: float) -> list[Batch | Outcome]:
        return self.runtime.poll(prompt_id, timeout)

    def interrupt(self, prompt_id: str | None) -> list[str]:
        return self.runtime.interrupt(prompt_id)

    def free(self, unload_models: bool, free_memory: bool) -> None:
        self.runtime.free(unload_models, free_memory)

    def report(self) -> WorkerReport:
        return self.runtime.report()


class WorkerPool:
    """The actors of one Loom server or batch run, by index."""

    def __init__(self, config: ClusterConfig, args: argparse.Namespace) -> None:
        self.config = config
        self.args = args
        self.actors: list[Any] = []
        self._started_ray = False

    @property
    def size(self) -> int:
        return self.config.workers

    def start(self) -> None:
        """Connect to the cluster (or start a local runtime) and create the worker actors;
        they build their Loom in the background (see `wait_ready`)."""
        self._connect()
        actor_class = ray.remote(
            num_cpus=self.config.cpus_per_worker, num_gpus=self.config.gpus_per_worker,
            max_concurrency=2 * self.config.prompts_per_worker + CONTROL_CALLS,
            max_restarts=-1, max_task_retries=0)(LoomWorkerActor)
        self.actors = [actor_class.remote(index, self.args, self.config.prompts_per_worker,
                                          self.config.factory)
                       for index in range(self.config.workers)]
        logger.info("started %d Loom worker(s) on %s (%.3g CPU, %.3g GPU, %d prompt(s) each)",
                    self.config.workers, self.config.shown_address, self.config.cpus_per_worker,
                    self.config.gpus_per_worker, self.config.prompts_per_worker)

    def _connect(self) -> None:
        if ray.is_initialized():
            return  # the embedding program (a test, a notebook) already connected
        options: dict[str, Any] = {"namespace": NAMESPACE,
                                   "log_to_driver": self.config.log_to_driver}
        if self.config.address.startswith("ray://"):
            ray.init(address=self.config.address, **options)  # Ray Client: no local options
        elif self.config.address:
            ray.init(address=self.config.address, include_dashboard=False, **options)
        else:
            cpus = max(os.cpu_count() or 1,
                       math.ceil(self.config.workers * self.config.cpus_per_worker))
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, **options)
        self._started_ray = True

    def wait_ready(self, index: int, timeout: float | None = None) -> WorkerReport | None:
        """The worker's report once its actor is up (waits while Ray starts or restarts it);
        None if that takes more than `timeout` seconds. WorkerFailed when it cannot start."""
        try:
            return ray.get(self.actors[index].report.remote(), timeout=timeout)
        except GetTimeoutError:
            return None
        except ActorUnavailableError:
            return None  # restarting: ask again
        except RayActorError as exc:
            raise WorkerFailed(f"worker {index} cannot start on {self.config.shown_address}: "
                               f"{exc}") from exc

    def reports(self, indices: list[int], timeout: float,
                ) -> tuple[dict[int, WorkerReport], set[int]]:
        """Fresh reports of the workers that answered within `timeout` seconds, and the
        indices of those found dead."""
        refs = {index: self.actors[index].report.remote() for index in indices}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        answered = set(ready)
        found: dict[int, WorkerReport] = {}
        dead = set()
        for index, ref in refs.items():
            if ref not in answered:
                continue
            try:
                found[index] = ray.get(ref)
            except RayActorError:
                dead.add(index)
        return found, dead

    def run(self, index: int, job: Job, label: str, on_batch: Callable[[Batch], None],
            ) -> Outcome:
        """Run `job` on worker `index`, handing each Batch to `on_batch` as it arrives.
        Raises WorkerLost when the worker dies or its node leaves the cluster."""
        actor = self.actors[index]
        try:
            ray.get(actor.start.remote(job))
            while True:
                for item in ray.get(actor.poll.remote(job.prompt_id, POLL_S)):
                    if isinstance(item, Outcome):
                        return item
                    on_batch(item)
        except RayActorError as exc:
            raise WorkerLost(index, label, type(exc).__name__) from exc
        except RayTaskError as exc:
            if isinstance(exc.cause, UnknownJob):
                raise WorkerLost(index, label, str(exc.cause)) from exc
            raise

    def interrupt(self, index: int, prompt_id: str | None) -> None:
        self.actors[index].interrupt.remote(prompt_id)

    def free(self, unload_models: bool, free_memory: bool) -> None:
        for actor in self.actors:
            actor.free.remote(unload_models, free_memory)

    def kill(self, index: int) -> None:
        """End worker `index` for good (Ray does not restart it)."""
        ray.kill(self.actors[index], no_restart=True)

    def shutdown(self) -> None:
        """End the workers, and the Ray runtime if this pool started or connected to it."""
        for index in range(len(self.actors)):
            try:
                self.kill(index)
            except (RayActorError, ValueError) as exc:
                logger.debug("worker %d already gone: %s", index, exc)
        self.actors = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
