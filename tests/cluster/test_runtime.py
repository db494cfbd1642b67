"""A worker's runtime in this process (no Ray): it builds its own Loom from the server's flags,
streams a job's events with the files its outputs wrote, and names itself in its errors."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.cluster.protocol import Batch, Job, Outcome, ShippedFile
from engine.cluster.runtime import UnknownJob, WorkerRuntime
from main import build_parser
from tests.web.inprocess import png_bytes
from tests.web.prompt_helpers import base_with_test_pack, image_workflow, slow_workflow


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> WorkerRuntime:
    base = base_with_test_pack(tmp_path_factory.mktemp("worker") / "base")
    args = build_parser()[0].parse_args(["--base-directory", str(base)])
    return WorkerRuntime(3, args)


def run(runtime: WorkerRuntime, job: Job,
        on_batch: Callable[[Batch], None] = lambda batch: None) -> tuple[list[Batch], Outcome]:
    """Start `job` and poll it to its end, as the server does through Ray."""
    runtime.start(job)
    batches: list[Batch] = []
    while True:
        for item in runtime.poll(job.prompt_id, timeout=1.0):
            if isinstance(item, Outcome):
                return batches, item
            batches.append(item)
            on_batch(item)


def events(batches: list[Batch]) -> list[tuple[str, dict[str, Any]]]:
    return [(call[1], call[2]) for batch in batches for call in batch.calls if call[0] == "event"]


def test_a_job_streams_its_events_and_ends_with_its_outcome(runtime: WorkerRuntime) -> None:
    batches, outcome = run(runtime, Job("p1", slow_workflow(4, steps=2, delay=0.0), ["3"], {}))
    names = [name for name, _ in events(batches)]
    assert names[0] == "execution_start" and "execution_success" in names
    assert outcome.status == "success" and outcome.outputs == {"3": {"text": ["value=4"]}}
    assert outcome.report is not None and outcome.report.prompts_run >= 1


def test_the_files_an_output_node_wrote_travel_with_its_executed_event(
        runtime: WorkerRuntime) -> None:
    batches, outcome = run(runtime, Job("p2", image_workflow(8, "shipped/img"), ["3"], {}))
    files = [f for batch in batches for f in batch.files]
    assert [(f.kind, f.subfolder) for f in files] == [("output", "shipped")]
    assert files[0].data.startswith(b"\x89PNG")
    assert outcome.outputs["3"]["images"][0]["filename"] == files[0].filename


def test_input_files_shipped_with_a_job_are_readable_by_its_nodes(
        runtime: WorkerRuntime) -> None:
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "sent.png"}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    shipped = ShippedFile("input", "", "sent.png", png_bytes((5, 4)))
    _, outcome = run(runtime, Job("p3", prompt, ["2"], {}, inputs=[shipped]))
    assert outcome.status == "success", outcome.error


def test_a_model_missing_on_the_worker_is_an_error_naming_the_worker(
        runtime: WorkerRuntime) -> None:
    prompt = {"4": {"class_type": "CheckpointLoaderSimple",
                    "inputs": {"ckpt_name": "absent.safetensors"}},
              "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
              "8": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["4", 2]}},
              "5": {"class_type": "EmptyLatentImage",
                    "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    batches, outcome = run(runtime, Job("p4", prompt, ["9"], {}))
    assert outcome.status == "error" and outcome.error is not None
    message = outcome.error["exception_message"]
    assert message.startswith(f"worker 3 ({runtime.host} pid {runtime.pid})")
    assert "absent.safetensors" in str(outcome.error["node_errors"])
    checkpoints = runtime.services.paths.folder_dirs("checkpoints")[0]
    assert f"missing here: checkpoints/absent.safetensors (looked in {checkpoints}" in message
    assert [name for name, _ in events(batches)] == ["execution_start", "execution_error"]


def test_an_interrupt_reaches_the_running_prompt(runtime: WorkerRuntime) -> None:
    job = Job("p5", slow_workflow(1, steps=200, delay=0.05), ["3"], {})
    reached: list[list[str]] = []

    def interrupt_at_first_progress(batch: Batch) -> None:
        if not reached and any(call[1] == "progress" for call in batch.calls):
            reached.append(runtime.interrupt("p5"))

    _, outcome = run(runtime, job, interrupt_at_first_progress)
    assert reached == [["p5"]] and outcome.status == "interrupted"


def test_a_poll_for_a_prompt_the_worker_does_not_run_is_refused(
        runtime: WorkerRuntime) -> None:
    with pytest.raises(UnknownJob, match="runs no prompt nope"):
        runtime.poll("nope", timeout=0.0)


def test_an_interrupt_that_arrives_before_its_prompt_stops_it_at_the_start(
        runtime: WorkerRuntime) -> None:
    assert runtime.interrupt("early") == []
    batches, outcome = run(runtime, Job("early", slow_workflow(1, steps=50, delay=0.05),
                                        ["3"], {}))
    assert outcome.status == "interrupted"
    assert not any(call[1] == "progress" for batch in batches for call in batch.calls)


def test_a_worker_takes_its_base_directory_from_its_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.cluster.runtime import worker_namespace

    monkeypatch.setenv("LOOM_BASE_DIRECTORY", str(tmp_path / "here"))
    args = build_parser()[0].parse_args(["--base-directory", "/server/only"])
    values = worker_namespace(args, tmp_path / "staging")
    assert values.base_directory == tmp_path / "here"
    assert values.output_directory == tmp_path / "staging" / "output"


def test_a_worker_with_two_slots_runs_two_prompts_at_once(tmp_path: Path) -> None:
    base = base_with_test_pack(tmp_path / "base")
    args = build_parser()[0].parse_args(["--base-directory", str(base)])
    runtime = WorkerRuntime(0, args, capacity=2)
    jobs = [Job(f"slot-{value}", slow_workflow(value, steps=400, delay=0.01), ["3"], {})
            for value in (1, 2)]
    for job in jobs:
        runtime.start(job)
    progressed: set[str] = set()
    while progressed != {"slot-1", "slot-2"}:  # both report steps before either is over
        for job in jobs:
            for item in runtime.poll(job.prompt_id, timeout=0.05):
                assert isinstance(item, Batch), "a prompt ended before the other one started"
                if any(call[1] == "progress" for call in item.calls):
                    progressed.add(job.prompt_id)
    assert len({id(executor) for executor in runtime.running.values()}) == 2
    assert sorted(runtime.interrupt(None)) == ["slot-1", "slot-2"]
    for job in jobs:
        ends: list[Batch | Outcome] = []
        while not any(isinstance(item, Outcome) for item in ends):
            ends = runtime.poll(job.prompt_id, timeout=1.0)
        assert isinstance(ends[-1], Outcome) and ends[-1].status == "interrupted"


def test_staging_folders_of_dead_worker_processes_are_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    from engine.cluster.runtime import remove_stale_staging

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = tmp_path / f"loom-worker-{gone.stdout.strip()}-abc"
    alive = tmp_path / f"loom-worker-{os.getpid()}-def"
    for folder in (dead, alive):
        (folder / "output").mkdir(parents=True)
    remove_stale_staging(tmp_path)
    assert not dead.exists() and alive.exists()
