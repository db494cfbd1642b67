"""Submitting and managing prompts: /prompt, /queue, /interrupt and /history.

POST /prompt accepts the API format and the editor format, validates (every problem at once, in
ComfyUI's error shape) and queues; the reply is {prompt_id, number, node_errors}."""

from __future__ import annotations

import copy
import json
import logging
import math
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from engine.events import timestamp_ms
from engine.gc_scope import older_objects_frozen
from engine.snapshot import PromptSnapshot
from engine.sweep import SweepError, SweepItem, expand, rows_from_request
from engine.validation import ValidationResult
from engine.workflow import WorkflowFormatError, is_ui_format, to_api_prompt
from web.jsonio import dumps, error_response, json_response, parse, read_json
from web.queue import QueueItem
from web.routing import ApiRoutes
from web.store import PromptText

if TYPE_CHECKING:
    from web.server import LoomServer

logger = logging.getLogger("loom.web.routes")


class BadRequest(ValueError):
    """A request the client must fix; the message says how."""


@dataclass
class Submission:
    """A POSTed prompt after conversion and validation."""

    api: dict[str, Any]
    api_text: PromptText  # `api` as JSON
    extra_data: dict[str, Any]
    validation: ValidationResult


def rejection(kind: str, message: str, details: str = "",
              node_errors: dict[str, Any] | None = None) -> web.Response:
    """HTTP 400 in ComfyUI's {"error", "node_errors"} shape."""
    return error_response(400, kind, message, details, node_errors)


def query_int(request: web.Request, name: str, default: int | None) -> int | None:
    """An integer query parameter (at most 64 bits, as SQLite takes them)."""
    text = request.query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError as exc:
        raise BadRequest(f"query parameter {name}={text[:40]!r} is not an integer") from exc
    if abs(value) >= 2**63:
        raise BadRequest(f"query parameter {name}={text[:40]!r} is out of range; use a number "
                         f"below 2**63")
    return value


def prepare_submission(server: LoomServer, body: dict[str, Any],
                       raw: bytes | None) -> Submission:
    """Convert (editor format -> API) and validate; runs on the validation thread."""
    prompt = body["prompt"]
    extra_data = body.get("extra_data", {})
    if not isinstance(extra_data, dict):
        raise BadRequest(f"extra_data must be an object, got {type(extra_data).__name__}")
    extra_data = dict(extra_data)
    if is_ui_format(prompt):
        api = to_api_prompt(prompt, server.registry.object_info(server.validation_services))
        pnginfo = extra_data.get("extra_pnginfo")
        pnginfo = dict(pnginfo) if isinstance(pnginfo, dict) else {}
        pnginfo.setdefault("workflow", prompt)  # so saved PNGs carry the editor graph
        extra_data["extra_pnginfo"] = pnginfo
    else:
        api = (dict(prompt) if set(map(type, prompt)) <= {str}  # always, when parsed from JSON
               else {str(node_id): node for node_id, node in prompt.items()})
    targets = body.get("partial_execution_targets")
    if targets is not None and (not isinstance(targets, list)
                                or not all(isinstance(t, (str, int)) for t in targets)):
        raise BadRequest("partial_execution_targets must be a list of output node ids")
    snapshot = server.last_request.snapshot(raw, api)
    validation = server.validator.validate(
        api, [str(t) for t in targets] if targets else None, snapshot)
    return Submission(api, server.prompt_texts.text(api, snapshot), extra_data, validation)


class LastRequest:
    """The latest POST /prompt body, its parse and its prompt's snapshot: a body sent again byte
    for byte (a script or the editor queueing the same prompt again) is neither parsed nor
    snapshotted again; a 10k-node body takes ~20 ms to parse. `body` is called on the event
    loop, `snapshot` on the validation thread; each keeps its own fields."""

    def __init__(self) -> None:
        self._raw = b""
        self._snapshot: PromptSnapshot | None = None
        self._parsed_raw = b""
        self._parsed: Any = None

    def body(self, raw: bytes) -> Any:
        """`raw` decoded as strict JSON (web.jsonio.parse), None when empty; the value nobody
        changes (POST /prompt only reads it). JsonBodyError when it is not acceptable JSON."""
        if not raw.strip():
            return None
        if self._parsed is None or raw != self._parsed_raw:
            with older_objects_frozen():  # a large body must not trigger full collections
                self._parsed = parse(raw)
            self._parsed_raw = raw
        return self._parsed

    def snapshot(self, raw: bytes | None, api: dict[str, Any]) -> PromptSnapshot:
        """The snapshot of `api`, the prompt of body `raw` (None: a body built here)."""
        if raw is None:
            return PromptSnapshot(api)
        if self._snapshot is None or raw != self._raw:
            self._snapshot, self._raw = PromptSnapshot(api), raw
        return self._snapshot


def queue_number(server: LoomServer, body: dict[str, Any]) -> int | float:
    """An explicit `number` as given (a float, as ComfyUI echoes it); else the next counter
    value, negative with `front` so it runs before everything pending."""
    if "number" in body:
        try:
            number = float(body["number"])
        except (TypeError, ValueError, OverflowError) as exc:
            raise BadRequest(f"number {body['number']!r} is not a number") from exc
        if not math.isfinite(number):
            raise BadRequest(f"number {body['number']!r} is not finite; send a finite number "
                             f"or leave it out")
        return number
    number = server.queue.next_number()
    return -number if body.get("front") else number


def add_routes(routes: ApiRoutes, server: LoomServer) -> None:
    """Register the prompt, queue, interrupt and history routes."""

    @routes.get("/prompt")
    async def get_prompt(request: web.Request) -> web.Response:
        return json_response({"exec_info": {"queue_remaining": server.queue_remaining()}})

    @routes.post("/prompt")
    async def post_prompt(request: web.Request) -> web.Response:
        raw: bytes | None = await request.read()
        body = server.last_request.body(raw)  # JsonBodyError: a 400 (web/errors.py)
        if not isinstance(body, dict):
            return rejection("invalid_prompt", "The request body must be a JSON object",
                             f"got {type(body).__name__}")
        if server.pack_server is not None and server.pack_server.on_prompt_handlers:
            body = server.pack_server.trigger_on_prompt(copy.deepcopy(body))  # packs' hooks
            raw = None  # a hook may change the prompt: the bytes received no longer name it
        try:
            if "loom_sweep" in body:
                return await submit_sweep(server, body)
            return await submit(server, body, raw)
        except BadRequest as exc:
            return rejection("invalid_prompt", "Invalid request", str(exc))
        except WorkflowFormatError as exc:
            return rejection("invalid_prompt", "The prompt is in neither the API nor the "
                             "editor format", str(exc))

    @routes.get("/queue")
    async def get_queue(request: web.Request) -> web.Response:
        reply = {"queue_running": [item.to_json() for item in server.queue.running()],
                 "queue_pending": [item.to_json() for item in server.queue.pending()]}
        cluster = server.worker.cluster_status()
        if cluster is not None:
            reply["loom_workers"] = cluster["workers"]
        return json_response(reply)

    @routes.post("/queue")
    async def post_queue(request: web.Request) -> web.Response:
        body = await request_object(request)
        removed = []
        if body.get("clear"):
            removed += server.queue.clear()
        if isinstance(body.get("delete"), list):
            removed += server.queue.delete(body["delete"])
        server.worker.forget(removed)
        return web.Response(status=200)

    @routes.post("/interrupt")
    async def post_interrupt(request: web.Request) -> web.Response:
        body = await request_object(request)
        prompt_id = body.get("prompt_id")
        server.worker.interrupt(prompt_id if isinstance(prompt_id, str) else None)
        return web.Response(status=200)

    add_history_routes(routes, server)


async def submit(server: LoomServer, body: dict[str, Any], raw: bytes | None) -> web.Response:
    """Number, validate and queue one POSTed prompt (`raw`: the body as received)."""
    number = queue_number(server, body)  # a rejected prompt uses up its number too
    if "prompt" not in body:
        return rejection("no_prompt", "No prompt provided", "No prompt provided")
    if not isinstance(body["prompt"], dict):
        return rejection("invalid_prompt", "The prompt must be a JSON object",
                         f"got {type(body['prompt']).__name__}")
    prompt_id = str(body.get("prompt_id") or uuid.uuid4())
    if server.queue.contains(prompt_id):
        raise BadRequest(f"prompt id {prompt_id!r} is already queued; send a new id or none")
    submission = await server.run_in_validation_thread(prepare_submission, server, body, raw)
    validation = submission.validation
    if validation.error is not None:
        logger.info("prompt rejected: %s %s", validation.error["message"],
                    validation.error["details"])
        return json_response(validation.to_json(), status=400)
    extra_data = submission.extra_data
    if "client_id" in body:
        extra_data["client_id"] = body["client_id"]
    extra_data["create_time"] = timestamp_ms()
    item = QueueItem(number, prompt_id, submission.api, extra_data, validation.outputs,
                     prompt_text=submission.api_text)
    server.worker.remember(prompt_id, validation.prompt, validation.outputs)
    try:
        server.queue.put(item)
    except BaseException as exc:
        server.worker.forget([prompt_id])  # refused or failed: nothing may keep it prepared
        if isinstance(exc, ValueError):
            raise BadRequest(str(exc)) from exc
        raise
    return json_response({"prompt_id": prompt_id, "number": number,
                          "node_errors": validation.node_errors})


async def submit_sweep(server: LoomServer, body: dict[str, Any]) -> web.Response:
    """POST /prompt with `loom_sweep` (Loom's extension, see README): one prompt per grid point
    or list entry, validated all before any is queued, each queued as by a plain POST /prompt
    with its outputs named by its overrides; the reply lists every prompt id."""
    try:
        rows = rows_from_request(body["loom_sweep"])
    except SweepError as exc:
        raise BadRequest(str(exc)) from exc
    prompt = body.get("prompt")
    if not isinstance(prompt, dict):
        return rejection("no_prompt", "No prompt provided", "a sweep needs a prompt to expand")
    extra_data = dict(body.get("extra_data") or {})
    if is_ui_format(prompt):
        extra_data["extra_pnginfo"] = {"workflow": prompt,
                                       **(extra_data.get("extra_pnginfo") or {})}
        prompt = await server.run_in_validation_thread(
            to_api_prompt, prompt, server.registry.object_info(server.validation_services))
    try:
        items = expand(prompt, rows)
    except SweepError as exc:
        raise BadRequest(str(exc)) from exc
    bodies = [sweep_body(body, item, extra_data, len(items)) for item in items]
    for item, item_body in zip(items, bodies, strict=True):
        checked = await server.run_in_validation_thread(prepare_submission, server, item_body, None)
        if checked.validation.error is not None:
            reply = checked.validation.to_json()
            reply["error"]["message"] = f"sweep item {item.label}: {reply['error']['message']}"
            return json_response(reply, status=400)
    replies = [json.loads((await submit(server, item_body, None)).body) for item_body in bodies]
    return json_response({**replies[0], "loom_sweep": {
        "prompt_ids": [reply["prompt_id"] for reply in replies],
        "numbers": [reply["number"] for reply in replies],
        "labels": [item.label for item in items]}})


def sweep_body(body: dict[str, Any], item: SweepItem, extra_data: dict[str, Any],
               count: int) -> dict[str, Any]:
    """The POST /prompt body of one sweep item (prompt ids get a -<n> suffix)."""
    single = {key: value for key, value in body.items() if key not in ("loom_sweep",
                                                                        "prompt_id")}
    if body.get("prompt_id"):
        single["prompt_id"] = f"{body['prompt_id']}-{item.index + 1}"
    sweep = {"index": item.index, "count": count, "label": item.label,
             "overrides": item.overrides}
    return {**single, "prompt": item.prompt, "extra_data": {**extra_data, "loom_sweep": sweep}}


async def request_object(request: web.Request) -> dict[str, Any]:
    """A body that should be a JSON object; an empty body or another JSON value counts as {}
    (JsonBodyError, a 400, when it is not JSON)."""
    body = await read_json(request, {})
    return body if isinstance(body, dict) else {}


def add_history_routes(routes: ApiRoutes, server: LoomServer) -> None:
    @routes.get("/history")
    async def get_history(request: web.Request) -> web.Response:
        try:
            max_items = query_int(request, "max_items", None)
            offset = query_int(request, "offset", -1)
        except BadRequest as exc:
            return rejection("invalid_query", "Invalid query parameter", str(exc))
        assert offset is not None
        return await stream_history(request, server, max_items, offset)

    @routes.get("/history/{prompt_id}")
    async def get_history_entry(request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        entry = server.history.entry_text(prompt_id)  # sent as stored, not decoded and encoded
        text = f"{{{dumps(prompt_id)}: {entry}}}" if entry is not None else "{}"
        return web.Response(text=text, content_type="application/json")

    @routes.post("/history")
    async def post_history(request: web.Request) -> web.Response:
        body = await request_object(request)
        if body.get("clear"):
            server.history.clear()
        if isinstance(body.get("delete"), list):
            server.history.delete(body["delete"])
        return web.Response(status=200)


async def stream_history(request: web.Request, server: LoomServer, max_items: int | None,
                         offset: int) -> web.StreamResponse:
    """GET /history written a page of rows at a time, straight from the stored JSON text, so
    the server never holds the whole reply (see History.pages for the window)."""
    response = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
    await response.prepare(request)
    separator = "{"
    for rows in server.history.pages(max_items, offset):
        text = ", ".join(f"{json.dumps(prompt_id)}: {entry}"
                         for prompt_id, entry in rows)
        await response.write((separator + text).encode("utf-8"))
        separator = ", "
    await response.write_eof(b"{}" if separator == "{" else b"}")
    return response
