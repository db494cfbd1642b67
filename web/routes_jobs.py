"""GET /jobs, GET /jobs/{id} and POST /jobs/cancel: the editor's (1.58+) queue panel API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from web.jobs import (
    FINISHED_STATUSES,
    history_job,
    job_detail,
    parse_statuses,
    queue_job,
    sort_key,
)
from web.jsonio import json_response
from web.routes_prompt import BadRequest, query_int, request_object
from web.routing import ApiRoutes

if TYPE_CHECKING:
    from web.server import LoomServer

SORT_FIELDS = ("created_at", "execution_duration")


def error(message: str) -> web.Response:
    return json_response({"error": message}, status=400)


def list_jobs(server: LoomServer, statuses: set[str], workflow_id: str | None, sort_by: str,
              descending: bool, limit: int | None, offset: int) -> dict[str, Any]:
    """Queue jobs and finished ones merged, sorted, then the page [offset, offset + limit)."""
    jobs = []
    if "in_progress" in statuses:
        jobs += [queue_job(item.to_json(), "in_progress") for item in server.queue.running()]
    if "pending" in statuses:
        jobs += [queue_job(item.to_json(), "pending") for item in server.queue.pending()]
    if workflow_id:
        jobs = [job for job in jobs if job.get("workflow_id") == workflow_id]
    total = len(jobs)
    finished = statuses & FINISHED_STATUSES
    if finished:
        # Only the first offset + limit of the finished ones can land on the page.
        wanted = None if limit is None else offset + limit
        done, count = server.history.jobs(finished, workflow_id, sort_by, descending, wanted)
        jobs += done
        total += count
    jobs.sort(key=sort_key(sort_by), reverse=descending)
    page = jobs[offset:] if limit is None else jobs[offset:offset + limit]
    return {"jobs": page, "pagination": {"offset": offset, "limit": limit, "total": total,
                                         "has_more": offset + len(page) < total}}


def find_job(server: LoomServer, prompt_id: str) -> dict[str, Any] | None:
    entry = server.history.entry(prompt_id)
    if entry is not None:
        return job_detail(history_job(prompt_id, entry), entry, None)
    for status, items in (("in_progress", server.queue.running()),
                          ("pending", server.queue.pending())):
        for item in items:
            if item.prompt_id == prompt_id:
                return job_detail(queue_job(item.to_json(), status), None, item.to_json())
    return None


def add_routes(routes: ApiRoutes, server: LoomServer) -> None:
    @routes.get("/jobs")
    async def get_jobs(request: web.Request) -> web.Response:
        try:
            statuses = parse_statuses(request.query.get("status"))
            limit = query_int(request, "limit", None)
            offset = query_int(request, "offset", 0) or 0
        except (ValueError, BadRequest) as exc:
            return error(str(exc))
        sort_by = request.query.get("sort_by", "created_at")
        sort_order = request.query.get("sort_order", "desc")
        if sort_by not in SORT_FIELDS:
            return error(f"sort_by must be one of {', '.join(SORT_FIELDS)}, got {sort_by!r}")
        if sort_order not in ("asc", "desc"):
            return error(f"sort_order must be asc or desc, got {sort_order!r}")
        if (limit is not None and limit < 0) or offset < 0:
            return error("limit and offset must not be negative")
        return json_response(list_jobs(server, statuses, request.query.get("workflow_id"),
                                           sort_by, sort_order == "desc", limit, offset))

    @routes.get("/jobs/{job_id}")
    async def get_job(request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        job = find_job(server, job_id)
        if job is None:
            return json_response({"error": f"Job not found: {job_id}"}, status=404)
        return json_response(job)

    @routes.post("/jobs/cancel")
    async def cancel_jobs(request: web.Request) -> web.Response:
        body = await request_object(request)
        ids = body.get("job_ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            return error("job_ids must be a list of job ids")
        cancelled = server.queue.delete(ids)
        server.worker.forget(cancelled)
        for running in server.worker.running_prompt_ids:
            if running in ids and server.worker.interrupt(running):
                cancelled.append(running)
        return json_response({"cancelled": cancelled})
