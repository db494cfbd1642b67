"""Routes about the server itself and what it offers: node definitions, extensions, system
stats, feature flags, freeing memory, logs, folder paths, and the empty answers the editor
expects from features Loom does not have (translations, global subgraphs, templates)."""

from __future__ import annotations

import logging
import os
import platform
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from aiohttp import web

from web import routes_models, static
from web.jsonio import json_response, read_json
from web.logs import LogBuffer
from web.routing import ApiRoutes

logger = logging.getLogger("loom.web.system")

# The ComfyUI server release whose wire protocol Loom speaks (../shared/compat/API.md).
COMFYUI_COMPAT_VERSION = "0.8.0"
FILE_LIST_TYPES = ("input", "output", "temp")
SECRET_FLAG = re.compile(r"token|key|secret|passw", re.IGNORECASE)
REDACTED = "<redacted>"


def loom_version() -> str:
    """The installed package's version, else the one pyproject.toml declares (a source tree)."""
    try:
        return version("loom")
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE)
        except OSError:
            found = None
        return found.group(1) if found else "unknown"


def memory_bytes() -> tuple[int, int]:
    """(total, available) RAM in bytes, from /proc/meminfo where there is one."""
    try:
        fields = dict(line.split(":", 1) for line in
                      Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        total = int(fields["MemTotal"].split()[0]) * 1024
        free = int(fields.get("MemAvailable", fields["MemFree"]).split()[0]) * 1024
        return total, free
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        return (os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page)


def torch_devices(use_cpu: bool, ram: tuple[int, int], vram: Any = None,
                  ) -> tuple[str, list[dict[str, Any]]]:
    """(torch version, the device list of /system_stats). `vram` (the model manager's memory
    probe figures, with `total` and `free`) gives the GPU's figures when there is one; free
    memory counts what torch's allocator holds unused, as ComfyUI's does."""
    import torch

    cpu = {"name": "cpu", "type": "cpu", "index": None, "vram_total": ram[0],
           "vram_free": ram[1], "torch_vram_total": ram[0], "torch_vram_free": ram[1]}
    if use_cpu or not torch.cuda.is_available():
        return torch.__version__, [cpu]
    index = torch.cuda.current_device()
    reserved = torch.cuda.memory_reserved(index)
    torch_free = reserved - torch.cuda.memory_allocated(index)
    if vram is None:
        free, total = torch.cuda.mem_get_info(index)
        free += torch_free
    else:
        free, total = vram.free, vram.total
    return torch.__version__, [{
        "name": f"cuda:{index} {torch.cuda.get_device_name(index)}", "type": "cuda",
        "index": index, "vram_total": total, "vram_free": free, "torch_vram_total": reserved,
        "torch_vram_free": torch_free}]


def redacted_argv(argv: list[str]) -> list[str]:
    """The command line with the value of every secret-bearing flag (--auth-token, and any flag
    naming a token, key, secret or password) replaced by '<redacted>'."""
    shown, hide_next = [], False
    for arg in argv:
        flag, equals, _ = arg.partition("=")
        secret = arg.startswith("--") and SECRET_FLAG.search(flag) is not None
        if hide_next and not arg.startswith("--"):
            shown.append(REDACTED)
        elif secret and equals:
            shown.append(f"{flag}={REDACTED}")
        else:
            shown.append(arg)
        hide_next = secret and not equals
    return shown


def system_stats(args: Any, model_manager: Any = None) -> dict[str, Any]:
    """`GET /system_stats` in ComfyUI's shape, plus `loom_version` and `loom_models` (the model
    manager's figures: loaded/evicted models, weight bytes per device, the RAM budget, the VRAM
    budget and what each model has on the GPU)."""
    ram = memory_bytes()
    memory_info = getattr(model_manager, "memory_info", None)
    torch_version, devices = torch_devices(bool(getattr(args, "cpu", False)), ram,
                                           memory_info() if memory_info else None)
    return {"system": {
        "os": sys.platform, "ram_total": ram[0], "ram_free": ram[1],
        "comfyui_version": COMFYUI_COMPAT_VERSION, "loom_version": loom_version(),
        "required_frontend_version": static.FRONTEND_VERSION,
        "python_version": sys.version, "pytorch_version": torch_version,
        "embedded_python": False, "argv": redacted_argv(sys.argv),
        "platform": platform.platform()}, "devices": devices,
        "loom_models": model_manager.stats() if hasattr(model_manager, "stats") else None}


def newest_first(directory: Path) -> list[str]:
    """`GET /internal/files/{type}`: the file names directly in `directory`, newest first."""
    if not directory.is_dir():
        return []
    files = [entry for entry in os.scandir(directory) if entry.is_file()]
    files.sort(key=lambda entry: entry.stat().st_mtime, reverse=True)
    return [entry.name for entry in files]


def server_log_buffer(server: Any) -> LogBuffer:
    """The server's log buffer, or a new one attached to the root logger."""
    existing = getattr(server, "log_buffer", None)
    return existing if isinstance(existing, LogBuffer) else LogBuffer().install()


def _add_info_routes(routes: ApiRoutes, server: Any) -> None:
    @routes.get("/object_info")
    async def object_info(request: web.Request) -> web.StreamResponse:
        return json_response(server.object_info())

    @routes.get("/object_info/{node_class}")
    async def object_info_one(request: web.Request) -> web.StreamResponse:
        node_class = request.match_info["node_class"]
        entry = server.object_info().get(node_class)
        return json_response({} if entry is None else {node_class: entry})

    @routes.get("/extensions")
    async def extensions(request: web.Request) -> web.StreamResponse:
        folders = static.extension_folders(static.frontend_root(server.args), server.registry)
        return json_response(static.extension_urls(folders))

    @routes.get("/system_stats")
    async def stats(request: web.Request) -> web.StreamResponse:
        stats = system_stats(server.args, server.services.model_manager)
        cluster = server.worker.cluster_status()
        if cluster is not None:
            stats["loom_cluster"] = cluster
        return json_response(stats)

    @routes.get("/features")
    async def features(request: web.Request) -> web.StreamResponse:
        return json_response(server.feature_flags())

    @routes.get("/loom/custom_nodes")
    async def custom_nodes(request: web.Request) -> web.StreamResponse:
        """The packs that loaded and those that failed (with why), for the editor."""
        registry = server.registry
        return json_response({"loaded": list(registry.loaded_packs),
                              "failed": [error.to_json() for error in registry.pack_errors]})

    @routes.post("/free")
    async def free(request: web.Request) -> web.StreamResponse:
        body = await read_json(request, {})
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text='expected {"unload_models": bool, "free_memory": bool}')
        server.free(unload_models=bool(body.get("unload_models", False)),
                    free_memory=bool(body.get("free_memory", False)))
        return web.Response()

    async def empty_object(request: web.Request) -> web.StreamResponse:
        return json_response({})

    for path in ("/i18n", "/global_subgraphs", "/workflow_templates"):
        routes.get(path)(empty_object)


def _add_internal_routes(routes: ApiRoutes, server: Any) -> None:
    paths = server.services.paths
    logs = server_log_buffer(server)

    @routes.get("/internal/folder_paths", api_twin=False)
    async def folder_paths(request: web.Request) -> web.StreamResponse:
        return json_response({kind: [str(directory) for directory in dirs]
                                  for kind, dirs in sorted(paths.models.items())})

    @routes.get("/internal/files/{directory_type}", api_twin=False)
    async def files(request: web.Request) -> web.StreamResponse:
        kind = request.match_info["directory_type"]
        if kind not in FILE_LIST_TYPES:
            raise web.HTTPBadRequest(text=f"unknown type {kind!r}; use one of {FILE_LIST_TYPES}")
        return json_response(newest_first(paths.folder_dirs(kind)[0]))

    @routes.get("/internal/logs", api_twin=False)
    async def log_text(request: web.Request) -> web.StreamResponse:
        return json_response(logs.text())

    @routes.get("/internal/logs/raw", api_twin=False)
    async def log_raw(request: web.Request) -> web.StreamResponse:
        return json_response(logs.raw())

    @routes.route("PATCH", "/internal/logs/subscribe", api_twin=False)
    async def log_subscribe(request: web.Request) -> web.StreamResponse:
        body = await read_json(request, {})
        client_id = body.get("clientId") if isinstance(body, dict) else None
        if not isinstance(client_id, str) or not client_id:
            raise web.HTTPBadRequest(text='expected {"enabled": bool, "clientId": "<id>"}')
        logs.subscribe(client_id, bool(body.get("enabled", False)))
        return web.Response()


def add_routes(routes: ApiRoutes, server: Any) -> None:
    """Register the system, model-folder and internal routes."""
    _add_info_routes(routes, server)
    routes_models.add_routes(routes, server)
    _add_internal_routes(routes, server)
