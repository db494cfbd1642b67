"""Human-readable text for validation and execution errors (the CLI and the server log)."""

from __future__ import annotations

from typing import Any

from engine.graph import Prompt


def describe_node(prompt: Prompt, node_id: str) -> str:
    node = prompt.nodes.get(node_id)
    if node is None:
        return f"node {node_id}"
    title = f" \"{node.title}\"" if node.title and node.title != node.class_type else ""
    return f"node {node_id} ({node.class_type}{title})"


def format_validation(error: dict[str, Any] | None, node_errors: dict[str, Any],
                      prompt: Prompt) -> str:
    """One line per problem: which node, which input, what was wrong, how to fix it."""
    lines = []
    if error is not None:
        details = f": {error['details']}" if error.get("details") else ""
        lines.append(f"error: {error['message']}{details}")
    for node_id, entry in node_errors.items():
        for problem in entry["errors"]:
            extra = problem.get("extra_info", {})
            where = describe_node(prompt, node_id)
            if extra.get("input_name"):
                where += f", input {extra['input_name']!r}"
            if "received_value" in extra:
                where += f" = {extra['received_value']!r}"
            details = f" ({problem['details']})" if problem.get("details") else ""
            lines.append(f"  {where}: {problem['message']}{details}")
    return "\n".join(lines)


def format_execution_error(payload: dict[str, Any], prompt: Prompt, verbose: bool) -> str:
    """The execution_error payload as text; the traceback only when verbose."""
    node_id = str(payload.get("node_id"))
    lines = [f"error: {describe_node(prompt, node_id)} failed: "
             f"{payload.get('exception_type')}: {payload.get('exception_message')}"]
    for name, values in (payload.get("current_inputs") or {}).items():
        shown = values[0] if len(values) == 1 else values
        lines.append(f"  input {name!r} = {shown!r}")
    if verbose:
        lines.append("".join(payload.get("traceback") or []).rstrip())
    else:
        lines.append("  (run with --verbose for the traceback)")
    return "\n".join(lines)
