"""User data and settings for the single user "default", kept under <user dir>/default/:
settings in comfy.settings.json (written atomically), workflows and other files beside it.
Every path is confined to that folder (403 on escape)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from engine.paths import PathError, confine
from web.errors import path_refusal
from web.fileio import atomic_write, max_upload_bytes, read_limited
from web.jsonio import json_response, parse
from web.routing import ApiRoutes

logger = logging.getLogger("loom.web.user")

USER = "default"
SETTINGS_FILE = "comfy.settings.json"


class UserFiles:
    """The default user's folder: settings and files, every path confined to it."""

    def __init__(self, user_root: Path) -> None:
        self.root = user_root / USER

    def path(self, relative: str) -> Path:
        """`relative` inside the user's folder; 400 empty, 403 outside."""
        if not relative:
            raise web.HTTPBadRequest(text="no file name given")
        try:
            return confine(self.root, relative)
        except PathError as exc:
            raise path_refusal(exc) from exc

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root.resolve()).as_posix()

    def inside(self, path: Path) -> bool:
        """Whether `path` (a listed entry, maybe a symlink) really lies in the user's folder."""
        base = self.root.resolve()
        target = path.resolve()
        return target == base or base in target.parents

    def info(self, path: Path, base: Path | None = None) -> dict[str, Any]:
        stat = path.stat()
        where = path.relative_to(base).as_posix() if base else self.relative(path)
        return {"path": where, "size": stat.st_size, "modified": stat.st_mtime,
                "created": stat.st_ctime}

    def read_settings(self) -> dict[str, Any]:
        """The saved settings; a corrupt file is set aside (never overwritten) and {} returned."""
        path = self.root / SETTINGS_FILE
        try:
            settings = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(settings, dict):
                return settings
            problem = f"holds a {type(settings).__name__}, not an object"
        except FileNotFoundError:
            return {}
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problem = str(exc)
        kept = path.with_name(f"{SETTINGS_FILE}.corrupt-{int(time.time())}")
        os.replace(path, kept)
        logger.error("settings file %s is unreadable (%s); kept it as %s and started afresh",
                     path, problem, kept)
        return {}

    def write_settings(self, settings: dict[str, Any]) -> None:
        data = json.dumps(settings, indent=4, ensure_ascii=False).encode("utf-8")
        atomic_write(self.root / SETTINGS_FILE, data)


def _flag(request: web.Request, name: str, default: str) -> bool:
    return request.query.get(name, default).lower() == "true"


def listing(files: UserFiles, request: web.Request) -> list[Any]:
    """`GET /userdata?dir=...`: files under dir as names, split names or full info."""
    directory = files.path(request.query.get("dir", ""))
    if not directory.is_dir():
        raise web.HTTPNotFound(text="Directory not found")
    pattern = "**/*" if _flag(request, "recurse", "false") else "*"
    found = sorted(path for path in directory.glob(pattern)
                   if path.is_file() and files.inside(path))
    if _flag(request, "full_info", "false"):
        return [files.info(path, directory) for path in found]
    names = [path.relative_to(directory).as_posix() for path in found]
    if _flag(request, "split", "false"):
        return [[name, *name.split("/")] for name in names]
    return names


def tree(files: UserFiles, relative: str) -> list[dict[str, Any]]:
    """`GET /v2/userdata?path=...`: every file and folder below, folders first."""
    target = files.path(relative) if relative else files.root.resolve()
    if not target.exists():
        if not relative:
            return []
        raise web.HTTPNotFound(text="Requested path not found")
    if not target.is_dir():
        raise web.HTTPBadRequest(text="Requested path is not a directory")
    entries = []
    for path in target.rglob("*"):
        if not files.inside(path):
            continue
        entry: dict[str, Any] = {"name": path.name, "path": files.relative(path)}
        if path.is_dir():
            entry["type"] = "directory"
        else:
            stat = path.stat()
            entry.update(type="file", size=stat.st_size, modified=stat.st_mtime)
        entries.append(entry)
    entries.sort(key=lambda entry: (entry["type"] != "directory", entry["name"].lower()))
    return entries


@contextmanager
def _bad_name_is_400(path: Path) -> Iterator[None]:
    """Turn a file-system refusal (odd characters, a file where a folder should be) into 400."""
    try:
        yield
    except OSError as exc:
        logger.warning("cannot write user file %s: %s", path, exc)
        raise web.HTTPBadRequest(text=f"cannot save {path.name!r}: {exc.strerror or exc}; "
                                      f"avoid characters like :\\/*?\"<>|") from exc


def _saved_reply(files: UserFiles, path: Path, full_info: bool) -> web.Response:
    return json_response(files.info(path) if full_info else files.relative(path))


def _add_settings_routes(routes: ApiRoutes, files: UserFiles, limit: int) -> None:
    @routes.get("/users")
    async def users(request: web.Request) -> web.StreamResponse:
        return json_response({"storage": "server", "migrated": True})

    @routes.post("/users")
    async def create_user(request: web.Request) -> web.StreamResponse:
        return json_response({"error": "Loom has a single user; no users can be added"},
                                 status=400)

    @routes.get("/settings")
    async def get_settings(request: web.Request) -> web.StreamResponse:
        return json_response(files.read_settings())

    @routes.post("/settings")
    async def post_settings(request: web.Request) -> web.StreamResponse:
        update = await _json(request, limit)
        if not isinstance(update, dict):
            raise web.HTTPBadRequest(text="POST /settings takes an object of setting ids")
        files.write_settings({**files.read_settings(), **update})
        return web.Response()

    @routes.get("/settings/{id}")
    async def get_setting(request: web.Request) -> web.StreamResponse:
        return json_response(files.read_settings().get(request.match_info["id"]))

    @routes.post("/settings/{id}")
    async def post_setting(request: web.Request) -> web.StreamResponse:
        value = await _json(request, limit)
        files.write_settings({**files.read_settings(), request.match_info["id"]: value})
        return web.Response()


async def _json(request: web.Request, limit: int) -> Any:
    """The body as strict JSON (JsonBodyError, a 400, when it is not), at most `limit` bytes."""
    return parse(await read_limited(request, limit))


def _add_file_routes(routes: ApiRoutes, files: UserFiles, limit: int) -> None:
    @routes.get("/userdata")
    async def list_files(request: web.Request) -> web.StreamResponse:
        return json_response(listing(files, request))

    @routes.get("/v2/userdata")
    async def list_tree(request: web.Request) -> web.StreamResponse:
        return json_response(tree(files, request.query.get("path", "")))

    @routes.get("/userdata/{file}")
    async def get_file(request: web.Request) -> web.StreamResponse:
        path = files.path(request.match_info["file"])
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    @routes.post("/userdata/{file}")
    async def post_file(request: web.Request) -> web.StreamResponse:
        path = files.path(request.match_info["file"])
        if request.query.get("overwrite", "true") == "false" and path.exists():
            raise web.HTTPConflict(text="File already exists")
        if path.is_dir():
            raise web.HTTPBadRequest(text=f"{files.relative(path)} is a folder")
        body = await read_limited(request, limit)
        with _bad_name_is_400(path):
            atomic_write(path, body)
        return _saved_reply(files, path, _flag(request, "full_info", "false"))

    @routes.delete("/userdata/{file}")
    async def delete_file(request: web.Request) -> web.StreamResponse:
        path = files.path(request.match_info["file"])
        if not path.is_file():
            raise web.HTTPNotFound()
        path.unlink()
        return web.Response(status=204)

    @routes.post("/userdata/{file}/move/{dest}")
    async def move_file(request: web.Request) -> web.StreamResponse:
        source = files.path(request.match_info["file"])
        dest = files.path(request.match_info["dest"])
        if not source.is_file():
            raise web.HTTPNotFound()
        if request.query.get("overwrite", "true") == "false" and dest.exists():
            raise web.HTTPConflict(text="File already exists")
        if dest.is_dir():
            raise web.HTTPBadRequest(text=f"{files.relative(dest)} is a folder")
        with _bad_name_is_400(dest):
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, dest)
        logger.info("moved user file %s -> %s", files.relative(source), files.relative(dest))
        return _saved_reply(files, dest, _flag(request, "full_info", "false"))


def add_routes(routes: ApiRoutes, server: Any) -> None:
    files = UserFiles(server.services.paths.user)
    limit = max_upload_bytes(server.args)
    _add_settings_routes(routes, files, limit)
    _add_file_routes(routes, files, limit)
