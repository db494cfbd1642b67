"""Model-folder routes: /embeddings, /models, /models/{folder}, the editor's model library
(/experiment/models...) and /view_metadata (a safetensors file's header metadata)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web

from engine.diffusion.checkpoints.safetensors_io import SafetensorsError, read_header
from engine.paths import PathError, Paths, within
from web.errors import path_refusal
from web.jsonio import json_response
from web.routing import ApiRoutes

# Folders the model library does not offer (not models).
LIBRARY_HIDDEN_FOLDERS = frozenset({"configs", "custom_nodes"})
PREVIEW_SUFFIXES = (".webp", ".png", ".jpg", ".jpeg", ".preview.png", ".preview.webp",
                    ".preview.jpg", ".preview.jpeg")
# A safetensors header is JSON of a few hundred KB at most; refuse absurd claims.


class MetadataError(ValueError):
    """A file whose safetensors header cannot be read."""


def _folder_dirs(paths: Paths, folder: str) -> list[Path]:
    try:
        return paths.folder_dirs(folder)
    except PathError as exc:
        raise web.HTTPNotFound(text=str(exc)) from exc


def model_library_files(paths: Paths, folder: str) -> list[dict[str, Any]]:
    """`GET /experiment/models/{folder}`: one entry per file, with the directory it came from."""
    entries = []
    for index, directory in enumerate(_folder_dirs(paths, folder)):
        for name in sorted(paths.files_in(folder, directory)):
            try:
                stat = (directory / name).stat()
            except OSError:
                continue  # vanished or a dangling symlink since it was listed
            entries.append({"name": name, "pathIndex": index, "modified": stat.st_mtime,
                            "created": stat.st_ctime, "size": stat.st_size})
    return entries


def safetensors_metadata(path: Path) -> dict[str, Any] | None:
    """The `__metadata__` object of a safetensors file's header (None when it has none)."""
    try:
        _, metadata, _ = read_header(path)
    except SafetensorsError as exc:
        raise MetadataError(str(exc)) from exc
    return metadata or None


def preview_image(directory: Path, model_name: str) -> Path | None:
    """An image stored beside a model file as its preview (`name.png`, `name.preview.webp`...),
    confined to the model's directory."""
    stem = model_name.rsplit(".", 1)[0] if "." in Path(model_name).name else model_name
    for suffix in PREVIEW_SUFFIXES:
        candidate = within(directory, stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def add_routes(routes: ApiRoutes, server: Any) -> None:
    paths: Paths = server.services.paths

    @routes.get("/embeddings")
    async def embeddings(request: web.Request) -> web.StreamResponse:
        names = (name.rsplit(".", 1)[0] for name in paths.list_files("embeddings"))
        return json_response(sorted(set(names)))

    @routes.get("/models")
    async def model_kinds(request: web.Request) -> web.StreamResponse:
        return json_response(sorted(paths.models))

    @routes.get("/models/{folder}")
    async def model_files(request: web.Request) -> web.StreamResponse:
        folder = request.match_info["folder"]
        _folder_dirs(paths, folder)
        return json_response(paths.list_files(folder))

    @routes.get("/experiment/models")
    async def library_folders(request: web.Request) -> web.StreamResponse:
        return json_response([
            {"name": kind, "folders": [str(directory) for directory in dirs]}
            for kind, dirs in sorted(paths.models.items()) if kind not in LIBRARY_HIDDEN_FOLDERS])

    @routes.get("/experiment/models/{folder}")
    async def library_files(request: web.Request) -> web.StreamResponse:
        return json_response(model_library_files(paths, request.match_info["folder"]))

    @routes.get("/experiment/models/preview/{folder}/{path_index}/{filename:.+}")
    async def library_preview(request: web.Request) -> web.StreamResponse:
        dirs = _folder_dirs(paths, request.match_info["folder"])
        index = request.match_info["path_index"]
        if not index.isdigit() or int(index) >= len(dirs):
            raise web.HTTPNotFound(text=f"no directory number {index}")
        try:
            preview = preview_image(dirs[int(index)], request.match_info["filename"])
        except PathError as exc:
            raise path_refusal(exc) from exc
        if preview is None:
            raise web.HTTPNotFound(text="this model has no preview image")
        return web.FileResponse(preview)

    @routes.get("/view_metadata/{folder}")
    async def view_metadata(request: web.Request) -> web.StreamResponse:
        filename = request.query.get("filename", "")
        if not filename.endswith(".safetensors"):
            raise web.HTTPNotFound(text="metadata is only read from .safetensors files")
        try:
            metadata = safetensors_metadata(paths.find_file(request.match_info["folder"],
                                                            filename))
        except PathError as exc:
            raise web.HTTPNotFound(text=str(exc)) from exc
        except (MetadataError, OSError) as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        if metadata is None:
            raise web.HTTPNotFound(text=f"{filename} has no metadata")
        return json_response(metadata)
