"""`main.py run WORKFLOW --sweep ...`: expand a sweep into prompts, validate them all, run them
(in this process, or across Ray workers with --ray) under one progress bar, and print a summary
table of each prompt's overrides, status, time, worker and output files."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from tqdm import tqdm

from engine.cli import (
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_OK,
    Override,
    UsageError,
    apply_overrides,
    load_prompt,
)
from engine.cluster.shipping import file_entries
from engine.context import Services
from engine.events import ExecutionListener
from engine.executor import Executor
from engine.graph import Prompt
from engine.registry import NodeRegistry
from engine.report import format_validation
from engine.sweep import SweepItem, combinations, expand, parse_axis
from engine.validation import validate_prompt
from engine.workflow import WorkflowFormatError


@dataclass
class BatchJob:
    """One validated prompt of a batch."""

    item: SweepItem
    prompt: Prompt
    outputs: list[str]
    extra_data: dict[str, Any]


@dataclass
class BatchRow:
    """How one prompt of a batch ended."""

    job: BatchJob
    status: str
    seconds: float
    worker: str
    files: list[str] = field(default_factory=list)
    error: str | None = None


Done = Callable[[BatchRow], None]


class BatchRunner(Protocol):
    def run(self, jobs: list[BatchJob], on_done: Done) -> list[BatchRow]: ...


def output_files(outputs: dict[str, dict[str, Any]]) -> list[str]:
    """`output/sub/name.png` for each file the output nodes' UI dicts name."""
    names = []
    for ui in outputs.values():
        for entry in file_entries(ui):
            subfolder = f"{entry['subfolder']}/" if entry.get("subfolder") else ""
            names.append(f"{entry['type']}/{subfolder}{entry['filename']}")
    return names


def error_text(error: dict[str, Any] | None) -> str | None:
    if not error:
        return None
    node = f"node {error['node_id']}: " if error.get("node_id") else ""
    return f"{node}{error.get('exception_type', 'error')}: {error.get('exception_message', '')}"


class InProcessRunner:
    """Runs the prompts one after another on this process's executor."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor

    def run(self, jobs: list[BatchJob], on_done: Done) -> list[BatchRow]:
        rows = []
        for job in jobs:
            started = time.perf_counter()
            result = self.executor.execute(job.prompt, job.outputs, extra_data=job.extra_data,
                                           listener=ExecutionListener())
            row = BatchRow(job, result.status, time.perf_counter() - started, "in process",
                           output_files(result.outputs), error_text(result.error))
            rows.append(row)
            on_done(row)
        return rows


def prepare_jobs(path: Path, registry: NodeRegistry, services: Services, *, overrides: list[str],
                 sweeps: list[str], zipped: bool) -> list[BatchJob] | str:
    """The validated prompts of a sweep; the text of every problem instead when any is bad."""
    api, extra_data = load_prompt(path, registry, services)
    api = apply_overrides(api, [Override.parse(text) for text in overrides])
    axes = [parse_axis(text) for text in sweeps]
    items = expand(api, combinations(axes, zipped) if axes else [{}])
    jobs, problems = [], []
    for item in items:
        checked = validate_prompt(item.prompt, registry, services)
        if checked.error is not None or checked.node_errors:
            shown = f"sweep item {item.label}" if item.label else "the workflow"
            text = format_validation(checked.error, checked.node_errors, checked.prompt)
            problems.append(f"{shown}:\n{text}")
        else:
            jobs.append(BatchJob(item, checked.prompt, checked.outputs, extra_data))
    return "\n".join(problems) if problems else jobs


def run_batch(path: Path, registry: NodeRegistry, services: Services, runner: BatchRunner, *,
              overrides: list[str], sweeps: list[str], zipped: bool = False,
              out: TextIO | None = None, quiet: bool = False) -> int:
    """The `run --sweep` / `run --ray` command; returns the process exit code."""
    out = out or sys.stdout
    try:
        prepared = prepare_jobs(path, registry, services, overrides=overrides, sweeps=sweeps,
                                zipped=zipped)
    except (OSError, WorkflowFormatError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if isinstance(prepared, str):
        print(prepared, file=sys.stderr)
        return EXIT_INVALID
    with tqdm(total=len(prepared), desc="prompts", unit="prompt", file=out,
              disable=quiet) as bar:
        rows = runner.run(prepared, lambda row: bar.update(1))
    if not quiet:
        print(summary_table(rows), file=out)
    for row in rows:
        if row.error:
            print(f"error: {row.job.item.label or 'prompt'}: {row.error}", file=sys.stderr)
    return EXIT_OK if all(row.status == "success" for row in rows) else EXIT_FAILED


def summary_table(rows: list[BatchRow]) -> str:
    """One line per prompt, in sweep order, then the totals."""
    header = ("#", "overrides", "status", "seconds", "worker", "outputs")
    lines = [header] + [
        (str(row.job.item.index + 1), row.job.item.label or "-", row.status,
         f"{row.seconds:.2f}", row.worker, " ".join(row.files) or "-")
        for row in sorted(rows, key=lambda row: row.job.item.index)]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header) - 1)]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False))
            + "  " + line[-1] for line in lines]
    succeeded = sum(row.status == "success" for row in rows)
    text.append(f"{succeeded} of {len(rows)} prompt(s) succeeded, "
                f"{sum(row.seconds for row in rows):.2f}s of prompt time")
    return "\n".join(text)
