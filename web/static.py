"""Serving the graph editor: ComfyUI's published frontend (the `comfyui-frontend-package`
distribution, or --front-end-root), our own editor extension from web/js, and the web folder
of every custom-node pack (WEB_DIRECTORY)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from engine.paths import PathError, confine
from web.errors import path_refusal
from web.jsonio import json_response
from web.template_graph import thumbnail_png
from web.templates import TemplateNotFound, build_template, template_index

logger = logging.getLogger("loom.web.static")

# The editor release Loom is tested against end to end (tests/web/test_browser.py).
FRONTEND_VERSION = "1.35.9"
FRONTEND_PACKAGE = "comfyui-frontend-package"
LOOM_EXTENSION_DIR = Path(__file__).resolve().parent / "js"
NO_CACHE = {"Cache-Control": "no-cache"}
THUMBNAIL_SUFFIX = "-1"  # the editor asks for <name>-1.<mediaSubtype>


class FrontendMissing(RuntimeError):
    """The editor's static files cannot be found."""


def package_static_dir() -> Path:
    """The static/ folder of the installed comfyui-frontend-package."""
    spec = importlib.util.find_spec("comfyui_frontend_package")
    if spec is None or not spec.submodule_search_locations:
        raise FrontendMissing(
            f"the graph editor is not installed; run `pip install "
            f"{FRONTEND_PACKAGE}=={FRONTEND_VERSION}` (or pass --front-end-root DIR)")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def frontend_root(args: Any) -> Path:
    """Where the editor's index.html lives: --front-end-root, else the installed package."""
    custom = getattr(args, "front_end_root", None)
    root = Path(custom) if custom else package_static_dir()
    if not (root / "index.html").is_file():
        raise FrontendMissing(
            f"no index.html in {root}; point --front-end-root at an editor build, or run "
            f"`pip install {FRONTEND_PACKAGE}=={FRONTEND_VERSION}`")
    return root.resolve()


def installed_frontend_version() -> str | None:
    """The installed package's version (None when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(FRONTEND_PACKAGE)
    except PackageNotFoundError:
        return None


def _scripts_under(directory: Path, url_prefix: str) -> list[str]:
    """URL paths of every .js file below `directory` (sorted; hidden folders skipped)."""
    if not directory.is_dir():
        return []
    urls = []
    for script in sorted(directory.rglob("*.js")):
        relative = script.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts):
            continue
        urls.append(f"{url_prefix}/{quote(relative.as_posix())}")
    return urls


def extension_urls(folders: dict[str, Path]) -> list[str]:
    """`GET /extensions`: every script of every extension folder, as URL paths."""
    urls = []
    for name, directory in folders.items():
        urls += _scripts_under(directory, f"/extensions/{quote(name)}")
    return urls


def _file_handler(path: Path, headers: dict[str, str] | None = None) -> Any:
    async def serve_file(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(path, headers=headers)
    return serve_file


def extension_folders(root: Path, registry: Any, *, warn: bool = False) -> dict[str, Path]:
    """URL folder under /extensions/ -> directory, in load order: the editor's own folders
    (`core`...), each custom-node pack's WEB_DIRECTORY, then Loom's own extension."""
    editor = root / "extensions"
    folders = {entry.name: entry for entry in sorted(editor.iterdir()) if entry.is_dir()} \
        if editor.is_dir() else {}
    for pack, directory in sorted(registry.web_directories.items()):
        if pack in folders or pack == "loom":
            if warn:
                logger.warning("custom-node pack %r: its web folder is not served; the name is "
                               "taken by the editor or Loom", pack)
            continue
        folders[pack] = Path(directory)
    folders["loom"] = LOOM_EXTENSION_DIR
    return folders


def _extension_handler(folders: dict[str, Path]) -> Any:
    async def serve_extension(request: web.Request) -> web.StreamResponse:
        directory = folders.get(request.match_info["folder"])
        if directory is None:
            raise web.HTTPNotFound()
        try:
            path = confine(directory, request.match_info["path"])
        except PathError as exc:
            raise path_refusal(exc) from exc
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)
    return serve_extension


def _templates_handler(server: Any) -> Any:
    """/templates/index.json, /templates/<name>.json and /templates/<name>-1.png (Loom's
    templates, web/templates.py); anything else, a localised index included, is a 404 (the
    editor then falls back to the English index)."""
    async def serve_template(request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("name", "")
        if name == "index.json":
            return json_response(template_index())
        stem, _, suffix = name.rpartition(".")
        try:
            if suffix == "json":
                return json_response(build_template(stem, server.registry.object_info()))
            if suffix == "png" and stem.endswith(THUMBNAIL_SUFFIX):
                workflow = build_template(stem.removesuffix(THUMBNAIL_SUFFIX),
                                          server.registry.object_info())
                return web.Response(body=thumbnail_png(workflow), content_type="image/png")
        except TemplateNotFound as exc:
            raise web.HTTPNotFound(text=str(exc.args[0])) from exc
        raise web.HTTPNotFound(text=f"no template file {name!r}")
    return serve_template


def add_static_routes(app: web.Application, server: Any) -> None:
    """Add the editor routes; a catch-all, so call it after every API route."""
    root = frontend_root(server.args)
    served = installed_frontend_version() if not getattr(server.args, "front_end_root", None) \
        else "custom"
    if served not in (FRONTEND_VERSION, "custom"):
        logger.warning("editor %s is installed; Loom is tested with %s (pip install %s==%s)",
                       served, FRONTEND_VERSION, FRONTEND_PACKAGE, FRONTEND_VERSION)
    logger.info("serving the editor from %s", root)
    app.router.add_get("/", _file_handler(root / "index.html", NO_CACHE))
    app.router.add_get("/templates/{name:.*}", _templates_handler(server))
    if (root / "assets" / "favicon.ico").is_file():  # browsers ask for /favicon.ico by default
        app.router.add_get("/favicon.ico", _file_handler(root / "assets" / "favicon.ico"))
    folders = extension_folders(root, server.registry, warn=True)
    app.router.add_get("/extensions/{folder}/{path:.+}", _extension_handler(folders))
    app.router.add_static("/", root)
