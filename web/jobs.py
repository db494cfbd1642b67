"""GET /jobs items: one view over running, pending and finished prompts (used by editor 1.58+).

Statuses: pending, in_progress, completed, failed, cancelled (an interrupted run)."""

from __future__ import annotations

from typing import Any

JOB_STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
FINISHED_STATUSES = frozenset({"completed", "failed", "cancelled"})
PREVIEWABLE_KINDS = frozenset({"images", "video", "audio", "3d", "text"})


def _present(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields whose value is known (the jobs API leaves unknown ones out)."""
    return {key: value for key, value in fields.items() if value is not None}


def _created_and_workflow(extra_data: dict[str, Any]) -> tuple[Any, Any]:
    pnginfo = extra_data.get("extra_pnginfo")
    workflow = pnginfo.get("workflow") if isinstance(pnginfo, dict) else None
    return extra_data.get("create_time"), (workflow.get("id") if isinstance(workflow, dict)
                                           else None)


def queue_job(item: list[Any], status: str) -> dict[str, Any]:
    """The job of a queue item (`status` pending or in_progress)."""
    number, prompt_id, _, extra_data, _ = item
    created, workflow_id = _created_and_workflow(extra_data)
    return _present({"id": prompt_id, "status": status, "priority": number,
                     "create_time": created, "outputs_count": 0,
                     "previewable_outputs_count": 0, "workflow_id": workflow_id})


def history_job(prompt_id: str, entry: dict[str, Any]) -> dict[str, Any]:
    """The job list item of a history entry."""
    number, _, _, extra_data, _ = entry["prompt"]
    created, workflow_id = _created_and_workflow(extra_data)
    status = entry["status"]
    started = ended = error = None
    interrupted = False
    for name, data in status["messages"]:
        if name == "execution_start":
            started = data.get("timestamp")
        elif name in ("execution_success", "execution_error", "execution_interrupted"):
            ended = data.get("timestamp")
            error = data if name == "execution_error" else None
            interrupted = name == "execution_interrupted"
    if status["status_str"] == "success":
        state = "completed"
    else:
        state = "cancelled" if interrupted else "failed"
    count, previewable, preview = summarise_outputs(entry["outputs"])
    return _present({"id": prompt_id, "status": state, "priority": number,
                     "create_time": created, "execution_start_time": started,
                     "execution_end_time": ended, "execution_error": error,
                     "outputs_count": count, "previewable_outputs_count": previewable,
                     "preview_output": preview, "workflow_id": workflow_id})


def job_detail(job: dict[str, Any], entry: dict[str, Any] | None,
               item: list[Any] | None) -> dict[str, Any]:
    """GET /jobs/{id}: the list item plus outputs, status and the submitted workflow."""
    detail = dict(job)
    source = entry["prompt"] if entry is not None else item
    if source is not None:
        detail["workflow"] = {"prompt": source[2], "extra_data": source[3]}
    if entry is not None:
        detail["outputs"] = entry["outputs"]
        detail["execution_status"] = entry["status"]
        detail["execution_meta"] = entry.get("meta", {})
        detail["update_time"] = job.get("execution_end_time")
    return detail


def summarise_outputs(outputs: dict[str, Any]) -> tuple[int, int, dict[str, Any] | None]:
    """(file outputs, previewable ones, the one to preview: a saved output before a temp one)."""
    count = previewable = 0
    saved = other = None
    for node_id, ui in outputs.items():
        if not isinstance(ui, dict):
            continue
        for kind, files in ui.items():
            if not isinstance(files, list):
                continue
            for file in files:
                if not isinstance(file, dict):
                    continue  # text values are not files
                count += 1
                if kind not in PREVIEWABLE_KINDS:
                    continue
                previewable += 1
                shown = {**file, "nodeId": node_id, "mediaType": file.get("mediaType", kind)}
                if file.get("type") == "output":
                    saved = saved or shown
                else:
                    other = other or shown
    return count, previewable, saved or other


def parse_statuses(text: str | None) -> set[str]:
    """`?status=a,b` as a set; all statuses when absent. ValueError names a bad value."""
    if text is None or not text.strip():
        return set(JOB_STATUSES)
    wanted = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(wanted - set(JOB_STATUSES))
    if unknown:
        raise ValueError(f"Invalid status value(s): {', '.join(unknown)}. "
                         f"Valid values: {', '.join(JOB_STATUSES)}")
    return wanted


def sort_key(sort_by: str) -> Any:
    if sort_by == "execution_duration":
        return lambda job: ((job.get("execution_end_time") or 0)
                            - (job.get("execution_start_time") or 0))
    return lambda job: job.get("create_time") or 0
