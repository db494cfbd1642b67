"""File routes: GET /view (images and other outputs, optionally re-encoded), POST /upload/image
and /upload/mask. Every path is confined to its root (input/, output/, temp/) after symlinks
are resolved; uploads are size-limited and must decode as images within Pillow's pixel guard."""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import BodyPartReader, web

from engine.image_budget import ImageBudget
from engine.paths import InvalidName, PathError, Paths, confine, name_parts, split_annotation
from web import images
from web.errors import bad_request, invalid_name, path_refusal
from web.fileio import atomic_write, max_upload_bytes, same_bytes, too_large, write_new
from web.jsonio import error_response, json_response
from web.routing import ApiRoutes

logger = logging.getLogger("loom.web.files")

FILE_TYPES = ("input", "output", "temp")
CHANNELS = ("rgba", "rgb", "a")
# Served files are user content: never let a browser run them as a page of this origin.
VIEW_SAFETY_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}
FORM_FIELD_LIMIT = 64 * 1024


def root_for(paths: Paths, kind: str) -> Path:
    if kind not in FILE_TYPES:
        raise web.HTTPBadRequest(text=f"unknown type {kind!r}; use one of {', '.join(FILE_TYPES)}")
    return paths.folder_dirs(kind)[0]


def check_filename(filename: str) -> None:
    """400 for names that try to leave their folder by themselves ('..', absolute) or that no
    folder can hold (too long, NUL)."""
    if not filename or ".." in filename or filename.startswith(("/", "\\")) or \
            "\x00" in filename or (len(filename) > 1 and filename[1] == ":"):
        raise web.HTTPBadRequest(text=f"invalid file name {filename!r}: give a plain name inside "
                                      f"the folder, without '..' or an absolute path")
    try:
        name_parts(filename)
    except InvalidName as exc:
        raise invalid_name(exc) from exc


def confined_dir(root: Path, subfolder: str) -> Path:
    """`root/subfolder`, 403 when it leads outside `root` (symlinks included)."""
    if not subfolder:
        return root.resolve()
    try:
        return confine(root, subfolder)
    except PathError as exc:
        raise path_refusal(exc) from exc


def confined_file(directory: Path, filename: str) -> Path:
    check_filename(filename)
    try:
        return confine(directory, filename)
    except PathError as exc:
        raise path_refusal(exc) from exc


def content_disposition(name: str) -> str:
    """`filename="<name>"`, with an RFC 5987 form for names that are not plain ASCII."""
    plain = name.replace("\\", "_").replace('"', "_")
    if plain.isascii() and plain.isprintable():
        return f'filename="{plain}"'
    fallback = plain.encode("ascii", "replace").decode().replace("?", "_")
    return f"filename=\"{fallback}\"; filename*=UTF-8''{quote(name)}"


def view_path(paths: Paths, query: Any) -> Path:
    """The file a /view query names: 400 bad name or type, 403 outside its root, 404 missing."""
    kind, filename = split_annotation(query.get("filename", ""), query.get("type", "output"))
    check_filename(filename)
    directory = confined_dir(root_for(paths, kind), query.get("subfolder", ""))
    path = confined_file(directory, filename)
    if not path.is_file():
        raise web.HTTPNotFound(text="")
    return path


async def view(request: web.Request, paths: Paths, budget: ImageBudget) -> web.StreamResponse:
    path = view_path(paths, request.query)
    channel = request.query.get("channel", "rgba").lower()
    if channel not in CHANNELS:
        raise web.HTTPBadRequest(text=f"unknown channel {channel!r}; use rgba, rgb or a")
    preview = images.parse_preview(request.query.get("preview"), channel)
    headers = {"Content-Disposition": content_disposition(path.name), **VIEW_SAFETY_HEADERS}
    if preview is None and channel == "rgba":
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return web.FileResponse(path, headers={**headers, "Content-Type": content_type})
    try:
        rendition = await asyncio.to_thread(images.render, path, channel, preview, budget)
    except images.ImageError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from exc
    return web.Response(body=rendition.data, content_type=rendition.content_type,
                        headers=headers)


@dataclass
class UploadForm:
    """The fields of an upload request; `data` is the file's bytes."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    data: bytes | None = None


async def _read_part(part: BodyPartReader, budget: int, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await part.read_chunk():
        size += len(chunk)
        if size > budget:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_upload_form(request: web.Request, limit: int) -> UploadForm:
    """Read a multipart upload, refusing (413) more than `limit` bytes in all."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    if not request.content_type.startswith("multipart/"):
        raise web.HTTPBadRequest(text="send the image as multipart/form-data (field 'image')")
    form, used = UploadForm(), 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise web.HTTPBadRequest(text="nested multipart bodies are not accepted")
            if part.name == "image" and part.filename is not None:
                form.filename = part.filename
                form.data = await _read_part(part, limit - used, limit)
                used += len(form.data)
            elif part.name:
                raw = await _read_part(part, min(limit - used, FORM_FIELD_LIMIT), limit)
                used += len(raw)
                form.fields[part.name] = raw.decode("utf-8", errors="replace")
    except ValueError as exc:  # no boundary, a broken part header (aiohttp's own checks)
        raise bad_request("invalid_request", "The request could not be parsed",
                          f"malformed multipart/form-data body ({exc}); send the image as a "
                          f"multipart form with the field 'image'") from exc
    return form


def store_upload(directory: Path, filename: str, data: bytes, overwrite: bool) -> str:
    """Save `data` as `filename` in `directory`: identical bytes reuse the existing file, other
    bytes get "name (1).ext", "name (2).ext"... unless `overwrite`. Returns the name used."""
    if overwrite:
        atomic_write(confined_file(directory, filename), data)
        return filename
    stem, dot, extension = filename.rpartition(".")
    stem, extension = (stem, dot + extension) if stem else (filename, "")
    for number in count():
        name = filename if number == 0 else f"{stem} ({number}){extension}"
        target = confined_file(directory, name)
        if same_bytes(target, data) or write_new(target, data):
            return name
    raise AssertionError("unreachable")


def mask_original(paths: Paths, raw_ref: str | None) -> Path:
    """The image an /upload/mask belongs to, from its `original_ref` field."""
    try:
        ref = json.loads(raw_ref or "")
    except json.JSONDecodeError as exc:
        raise web.HTTPBadRequest(text=f"original_ref is not JSON: {exc}") from exc
    if not isinstance(ref, dict) or not isinstance(ref.get("filename"), str):
        raise web.HTTPBadRequest(text='original_ref must be {"filename", "subfolder", "type"}')
    kind, filename = split_annotation(ref["filename"], str(ref.get("type") or "output"))
    check_filename(filename)
    directory = confined_dir(root_for(paths, kind), str(ref.get("subfolder") or ""))
    original = confined_file(directory, filename)
    if not original.is_file():
        raise web.HTTPNotFound(text=f"original image {filename!r} not found in {kind}")
    return original


def _is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "1", "yes")


async def upload(request: web.Request, paths: Paths, limit: int, budget: ImageBudget,
                 mask: bool) -> web.Response:
    form = await read_upload_form(request, limit)
    if form.data is None or not form.filename:
        raise web.HTTPBadRequest(text="")
    kind = form.fields.get("type") or "input"
    subfolder = form.fields.get("subfolder", "")
    directory = confined_dir(root_for(paths, kind), subfolder)
    check_filename(form.filename)
    if "/" in form.filename or "\\" in form.filename:
        raise web.HTTPBadRequest(text=f"invalid file name {form.filename!r}: no folders in it; "
                                      f"use the subfolder field")
    try:
        if mask:
            data = await asyncio.to_thread(images.apply_mask,
                                           mask_original(paths, form.fields.get("original_ref")),
                                           form.data, budget)
        else:
            await asyncio.to_thread(images.verify_upload, form.data, budget)
            data = form.data
    except images.ImageError as exc:
        return error_response(400, "invalid_image", "The image was refused", str(exc))
    name = await asyncio.to_thread(store_upload, directory, form.filename, data,
                                   _is_true(form.fields.get("overwrite")))
    logger.info("uploaded %s to %s/%s", name, kind, subfolder)
    return json_response({"name": name, "subfolder": subfolder, "type": kind})


def add_routes(routes: ApiRoutes, server: Any) -> None:
    paths: Paths = server.services.paths
    budget: ImageBudget = server.services.image_budget
    limit = max_upload_bytes(server.args)

    @routes.get("/view")
    async def view_file(request: web.Request) -> web.StreamResponse:
        return await view(request, paths, budget)

    @routes.post("/upload/image")
    async def upload_image(request: web.Request) -> web.StreamResponse:
        return await upload(request, paths, limit, budget, mask=False)

    @routes.post("/upload/mask")
    async def upload_mask(request: web.Request) -> web.StreamResponse:
        return await upload(request, paths, limit, budget, mask=True)
