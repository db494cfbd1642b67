"""`main.py run`: validate and execute a saved workflow headless, with a progress bar."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from engine.context import Services
from engine.events import ExecutionListener
from engine.executor import Executor
from engine.graph import Prompt
from engine.registry import NodeRegistry
from engine.report import describe_node, format_execution_error, format_validation
from engine.validation import validate_prompt
from engine.workflow import WorkflowFormatError, read_workflow_file, ui_to_api

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


class UsageError(ValueError):
    """A bad command-line value; the message says what to type instead."""


@dataclass(frozen=True)
class Override:
    """One --set NODE_ID.INPUT=VALUE."""

    node_id: str
    input_name: str
    value: Any

    @classmethod
    def parse(cls, text: str) -> Override:
        target, sep, raw = text.partition("=")
        node_id, dot, input_name = target.partition(".")
        if not sep or not dot or not node_id or not input_name:
            raise UsageError(f"--set {text!r}: expected NODE_ID.INPUT=VALUE, e.g. --set 3.seed=42")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # plain text, e.g. --set 6.text=a cat
        return cls(node_id, input_name, value)


def apply_overrides(api: dict[str, Any], overrides: list[Override]) -> dict[str, Any]:
    """A copy of the API prompt with each override's literal input replaced."""
    result = {node_id: {**body, "inputs": dict(body.get("inputs", {}))}
              for node_id, body in api.items()}
    for item in overrides:
        if item.node_id not in result:
            known = ", ".join(sorted(result, key=lambda n: (len(n), n)))
            raise UsageError(f"--set {item.node_id}.{item.input_name}: the workflow has no node "
                             f"{item.node_id!r} (its nodes: {known})")
        result[item.node_id]["inputs"][item.input_name] = item.value
    return result


def load_prompt(path: Path, registry: NodeRegistry,
                services: Services) -> tuple[dict[str, Any], dict[str, Any]]:
    """(API prompt, extra_data) from an API JSON, editor JSON or PNG workflow file."""
    api, ui = read_workflow_file(path)
    if api is None:
        api = ui_to_api(ui, registry.object_info(services))
    extra_data = {"extra_pnginfo": {"workflow": ui}} if ui is not None else {}
    return api, extra_data


class CliListener(ExecutionListener):
    """Prints each node as it runs and a progress bar for nodes that report steps."""

    def __init__(self, prompt: Prompt, out: TextIO, quiet: bool = False) -> None:
        self.prompt = prompt
        self.out = out
        self.quiet = quiet
        self.bar: tqdm | None = None
        self.bar_node: str | None = None

    def event(self, name: str, data: dict[str, Any]) -> None:
        if name == "progress":
            self._progress(data["node"], data["value"], data["max"])
            return
        self._close_bar()
        if self.quiet:
            return
        if name == "executing" and data.get("node") is not None:
            print(f"running {describe_node(self.prompt, data['node'])}", file=self.out)
        elif name == "execution_cached" and data["nodes"]:
            print(f"cached: {', '.join(data['nodes'])}", file=self.out)
        elif name == "executed":
            for image in data["output"].get("images", []):
                sub = f"{image['subfolder']}/" if image.get("subfolder") else ""
                print(f"  wrote {image.get('type', 'output')}/{sub}{image['filename']}",
                      file=self.out)

    def _progress(self, node_id: str, value: float, total: float) -> None:
        if self.bar is None or self.bar_node != node_id or self.bar.total != total:
            self._close_bar()
            self.bar = tqdm(total=total, desc=f"node {node_id}", file=self.out, leave=False,
                            disable=self.quiet)
            self.bar_node = node_id
        self.bar.update(value - self.bar.n)

    def close(self) -> None:
        self._close_bar()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_workflow(path: Path, registry: NodeRegistry, services: Services, executor: Executor, *,
                 overrides: list[str], dry_run: bool, verbose: bool, quiet: bool = False,
                 out: TextIO | None = None) -> int:
    """The `run` command; returns the process exit code."""
    out = out or sys.stdout
    try:
        api, extra_data = load_prompt(path, registry, services)
        api = apply_overrides(api, [Override.parse(text) for text in overrides])
    except (OSError, WorkflowFormatError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    checked = validate_prompt(api, registry, services)
    if checked.error is not None or checked.node_errors:
        print(format_validation(checked.error, checked.node_errors, checked.prompt),
              file=sys.stderr)
        return EXIT_INVALID
    if dry_run:
        return _print_plan(checked.prompt, checked.outputs, out)
    listener = CliListener(checked.prompt, out, quiet)
    result = executor.execute(checked.prompt, checked.outputs, extra_data=extra_data,
                              listener=listener)
    listener.close()
    if result.status == "error":
        print(format_execution_error(result.error or {}, checked.prompt, verbose),
              file=sys.stderr)
        return EXIT_FAILED
    if result.status == "interrupted":
        print("interrupted", file=sys.stderr)
        return EXIT_FAILED
    if not quiet:
        total = sum(result.timings.values())
        print(f"done: {len(result.executed)} node(s) ran, {len(result.cached)} cached, "
              f"{total:.2f}s", file=out)
    return EXIT_OK


def _print_plan(prompt: Prompt, outputs: list[str], out: TextIO) -> int:
    order = prompt.order_for(outputs)
    print(f"valid: {len(order)} node(s) would run, in this order:", file=out)
    for position, node_id in enumerate(order, 1):
        print(f"  {position:3d}. {describe_node(prompt, node_id)}", file=out)
    return EXIT_OK
