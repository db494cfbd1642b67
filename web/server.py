"""The server object (created in main.py and passed to every route module) and the aiohttp
application built around it."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from engine import comfy_host
from engine.context import Services
from engine.executor import Executor
from engine.graph import GraphPlanner
from engine.registry import NodeRegistry
from engine.validation import PromptValidator
from web import (
    errors,
    routes_files,
    routes_jobs,
    routes_prompt,
    routes_system,
    routes_user,
    security,
    static,
    websocket,
)
from web.comfy_server import PackPromptServer
from web.history import DEFAULT_MAX_ITEMS, History
from web.queue import PromptQueue, PromptTexts
from web.routes_prompt import LastRequest
from web.routing import ApiRoutes
from web.store import Store
from web.websocket import SocketHub
from web.worker import Worker

logger = logging.getLogger("loom.web.server")

DATABASE_NAME = "loom.db"
WORKER_STOP_TIMEOUT_S = 10.0


class LoomServer:
    """Everything the routes share: the engine objects, the queue, the sockets, the worker."""

    def __init__(self, registry: NodeRegistry, services: Services, executor: Executor,
                 args: argparse.Namespace,
                 worker: Callable[[LoomServer], Worker] = Worker) -> None:
        self.registry = registry
        self.services = services
        self.executor = executor
        self.args = args
        self.store = Store(services.paths.user / DATABASE_NAME)
        self.history = History(self.store, getattr(args, "max_history_items", DEFAULT_MAX_ITEMS))
        self.sockets = SocketHub()
        self.queue = PromptQueue(self.store, self.history, on_change=self.broadcast_status)
        self.worker = worker(self)  # with --ray, web.cluster_worker.ClusterWorker
        # POST /prompt converts and validates off the event loop, one prompt at a time, with a
        # planner of its own (the worker thread uses the executor's).
        self.validation_services = dataclasses.replace(services, graph_planner=GraphPlanner())
        self.validation_pool = ThreadPoolExecutor(1, thread_name_prefix="loom-validate")
        # server.PromptServer.instance of custom-node packs (main.py made it before they loaded)
        self.app: web.Application | None = None  # set by create_app
        self.pack_server: PackPromptServer | None = comfy_host.HOST.prompt_server
        if self.pack_server is not None:
            self.pack_server.adopt(self)
        # Both used on that thread only: they remember the latest prompt.
        self.validator = PromptValidator(registry, self.validation_services)
        self.prompt_texts = PromptTexts()
        self.last_request = LastRequest()

    def object_info(self) -> dict[str, Any]:
        return self.registry.object_info(self.services)

    def feature_flags(self) -> dict[str, Any]:
        """What this server supports (WebSocket `feature_flags` reply and GET /features)."""
        return {"supports_preview_metadata": True,
                "max_upload_size": int(self.args.max_upload_size * 2**20)}

    def queue_remaining(self) -> int:
        return self.queue.remaining()

    def status_data(self) -> dict[str, Any]:
        return {"status": {"exec_info": {"queue_remaining": self.queue_remaining()}}}

    def broadcast_status(self) -> None:
        self.sockets.broadcast("status", self.status_data())

    def free(self, unload_models: bool, free_memory: bool) -> None:
        """POST /free: unload models, and with `free_memory` drop cached outputs too (done by
        the worker before its next prompt)."""
        self.worker.request_free(unload_models, free_memory)

    async def run_in_validation_thread(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.validation_pool, function,
                                                                 *args)

    # -- lifetime ---------------------------------------------------------------------------
    async def on_startup(self, app: web.Application) -> None:
        await self.sockets.start()
        self.worker.start()

    async def on_shutdown(self, app: web.Application) -> None:
        await self.sockets.stop()

    async def on_cleanup(self, app: web.Application) -> None:
        stopped = await asyncio.to_thread(self.worker.stop, WORKER_STOP_TIMEOUT_S)
        if not stopped:
            logger.warning("the running node did not stop within %.0f s; its prompt stays "
                           "queued and runs first after a restart", WORKER_STOP_TIMEOUT_S)
        self.validation_pool.shutdown(wait=True)
        self.close()

    def close(self) -> None:
        """Close the database (the worker must be stopped first)."""
        self.store.close()


def create_app(server: LoomServer) -> web.Application:
    """The aiohttp application: API routes (bare and under /api), /ws, then the editor."""
    app = web.Application(middlewares=[*security.middlewares(server), errors.client_errors],
                          client_max_size=int(server.args.max_upload_size * 2**20) + 2**20)
    server.app = app
    routes = ApiRoutes()
    routes_prompt.add_routes(routes, server)
    routes_jobs.add_routes(routes, server)
    websocket.add_routes(routes, server)
    routes_system.add_routes(routes, server)
    routes_files.add_routes(routes, server)
    routes_user.add_routes(routes, server)
    routes.install(app.router)
    if server.pack_server is not None:  # custom-node packs' routes, behind the same middlewares
        server.pack_server.install_routes(app)
    static.add_static_routes(app, server)  # last: it serves the editor at / (a catch-all)
    app.on_startup.append(server.on_startup)
    app.on_shutdown.append(server.on_shutdown)
    app.on_cleanup.append(server.on_cleanup)
    return app


def listen_hosts(listen: str) -> list[str]:
    """--listen's addresses (ComfyUI accepts a comma-separated list)."""
    hosts = [host.strip() for host in listen.split(",") if host.strip()]
    return hosts or ["127.0.0.1"]


def url_for(host: str, port: int, scheme: str = "http") -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


def tls_context(args: Any) -> ssl.SSLContext | None:
    """ComfyUI's --tls-keyfile/--tls-certfile: serve HTTPS with that key and certificate."""
    keyfile, certfile = getattr(args, "tls_keyfile", None), getattr(args, "tls_certfile", None)
    if not keyfile:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot use --tls-certfile {certfile} with --tls-keyfile {keyfile}: "
                         f"{exc}; give a PEM certificate and its private key") from exc
    return context


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (before anything starts, so a taken port fails fast)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def run_server(server: LoomServer) -> int:
    """Serve until Ctrl-C or SIGTERM; the worker is stopped and the database closed on exit."""
    hosts = listen_hosts(server.args.listen)
    sockets: list[socket.socket] = []
    try:
        tls = tls_context(server.args)
        for host in hosts:
            sockets.append(bind(host, server.args.port))
        app = create_app(server)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        server.close()
        logger.error("cannot serve on %s port %d: %s; pick another --port or stop the program "
                     "using it", ",".join(hosts), server.args.port, exc)
        return 1
    except ValueError as exc:  # unusable TLS files
        server.close()
        logger.error("%s", exc)
        return 1
    except BaseException:
        server.close()
        raise

    scheme = "https" if tls is not None else "http"

    def announce(_: str) -> None:  # run_app calls this once it serves
        for host in hosts:
            logger.info("Loom serving on %s", url_for(host, server.args.port, scheme))

    access_log = logging.getLogger("aiohttp.access") if server.args.verbose else None
    web.run_app(app, sock=sockets, print=announce, access_log=access_log, shutdown_timeout=5,
                ssl_context=tls)
    logger.info("Loom stopped")
    return 0
