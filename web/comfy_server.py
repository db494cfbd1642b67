"""`server.PromptServer.instance` for custom-node packs: ComfyUI's server object as packs see it,
over Loom's web objects.

main.py creates it before packs load (packs add routes at import time), binds it through
engine.comfy_host, and LoomServer adopts it when it serves: pack routes then join Loom's aiohttp
app behind the same middlewares (origin check, auth token), and `send_sync` reaches the
editor's WebSocket clients. Without a server (`main.py run`) messages have nobody to go to."""

from __future__ import annotations

import asyncio
import enum
import io
import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from engine.comfy_host import HOST, bind_prompt_server, running_node
from web.previews import text_frame

if TYPE_CHECKING:
    from web.server import LoomServer

logger = logging.getLogger("loom.custom_nodes")

PromptHandler = Callable[[dict[str, Any]], dict[str, Any]]


class BinaryEventTypes(enum.IntEnum):
    """ComfyUI's binary WebSocket frame kinds (first 4 bytes, big-endian)."""

    PREVIEW_IMAGE = 1
    UNENCODED_PREVIEW_IMAGE = 2
    TEXT = 3
    PREVIEW_IMAGE_WITH_METADATA = 4


class _BoundInstance(type):
    """`PromptServer.instance` reads the facade bound in engine.comfy_host (one binding point)."""

    @property
    def instance(cls) -> PackPromptServer:
        bound = HOST.prompt_server
        if bound is None:
            raise RuntimeError("PromptServer.instance is read before Loom created it; main.py "
                               "creates it (web.comfy_server.create_pack_server) before packs load")
        return bound


class PackPromptServer(metaclass=_BoundInstance):
    """What packs reach through `PromptServer.instance`."""

    def __init__(self) -> None:
        self.routes = web.RouteTableDef()
        self.on_prompt_handlers: list[PromptHandler] = []
        self.client_id: str | None = None
        self.number = 0
        self.supports = ["custom_nodes_from_web"]
        self._loom: LoomServer | None = None
        self._last_node_id: str | None = None
        # `app` before Loom serves: packs add routes to it at import; they move to Loom's app.
        self._early_app = web.Application()

    # -- attributes packs read -------------------------------------------------------------
    @property
    def last_node_id(self) -> str | None:
        current = running_node()
        return current.node_id if current is not None else self._last_node_id

    @last_node_id.setter
    def last_node_id(self, node_id: str | None) -> None:
        self._last_node_id = node_id

    @property
    def app(self) -> web.Application:
        """Loom's application while serving; before that, one whose routes join it later."""
        return self._loom.app if self._loom is not None and self._loom.app is not None \
            else self._early_app

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._require("PromptServer.instance.loop").sockets.loop
        if loop is None:
            raise RuntimeError("PromptServer.instance.loop is read before the server started; "
                               "read it inside a route handler or a running node")
        return loop

    @property
    def prompt_queue(self) -> PackPromptQueue:
        return PackPromptQueue(self)

    @property
    def sockets(self) -> dict[str, Any]:
        loom = self._loom
        return {} if loom is None else {sid: None for sid in loom.sockets.connected()}

    # -- sending ------------------------------------------------------------------------------
    def send_sync(self, event: Any, data: Any, sid: str | None = None) -> None:
        """A message to client `sid`, or to every client when `sid` is None (as ComfyUI)."""
        if self._loom is None:
            logger.debug("send_sync(%r) with no server running; nobody receives it", event)
            return
        hub = self._loom.sockets
        if isinstance(event, BinaryEventTypes) or isinstance(event, int):
            hub.send_binary(_binary_frame(int(event), data), sid)
        elif sid is None:
            hub.broadcast(str(event), data)
        else:
            hub.send(str(event), data, sid)

    async def send(self, event: Any, data: Any, sid: str | None = None) -> None:
        self.send_sync(event, data, sid)

    async def send_json(self, event: str, data: Any, sid: str | None = None) -> None:
        self.send_sync(event, data, sid)

    def send_progress_text(self, text: str | bytes, node_id: str, sid: str | None = None) -> None:
        if self._loom is None:
            logger.debug("send_progress_text for node %s with no server running", node_id)
            return
        self._loom.sockets.send_binary(text_frame(node_id, text), sid or self.client_id)

    def add_on_prompt_handler(self, handler: PromptHandler) -> None:
        """Called with each POST /prompt body before validation; returns the body to use."""
        self.on_prompt_handlers.append(handler)

    def trigger_on_prompt(self, json_data: dict[str, Any]) -> dict[str, Any]:
        for handler in self.on_prompt_handlers:
            try:
                json_data = handler(json_data)
            except Exception:  # noqa: BLE001 - ComfyUI's rule: a failing pack hook is logged
                logger.exception("on_prompt handler %r failed; the prompt goes on without it",
                                 handler)
        return json_data

    # -- wiring (LoomServer) ------------------------------------------------------------------
    def adopt(self, loom: LoomServer) -> None:
        self._loom = loom

    def install_routes(self, app: web.Application) -> None:
        """Add the packs' routes to Loom's app (before its catch-all editor route)."""
        app.router.add_routes(self.routes)
        for resource in self._early_app.router.resources():
            if isinstance(resource, web.StaticResource):
                info = resource.get_info()
                app.router.add_static(info["prefix"], info["directory"])
                continue
            for route in resource:
                app.router.add_route(route.method, resource.canonical, route.handler)

    def _require(self, what: str) -> LoomServer:
        if self._loom is None:
            raise RuntimeError(f"{what} is only available while Loom serves (python main.py); "
                               f"`main.py run` has no web server")
        return self._loom


class PackPromptQueue:
    """`PromptServer.instance.prompt_queue`: what packs read of ComfyUI's queue, over Loom's."""

    def __init__(self, server: PackPromptServer) -> None:
        self._server = server

    @property
    def currently_running(self) -> dict[int, tuple[Any, ...]]:
        loom = self._server._loom
        if loom is None:
            return {}
        return {item.number: tuple(item.to_json()) for item in loom.queue.running()}

    def get_tasks_remaining(self) -> int:
        loom = self._server._loom
        return 0 if loom is None else loom.queue_remaining()

    def put(self, item: Any) -> None:
        raise NotImplementedError("PromptServer.instance.prompt_queue.put: packs cannot queue "
                                  "prompts behind Loom's validation; POST them to /prompt")


def _binary_frame(kind: int, data: Any) -> bytes:
    """ComfyUI's binary message: the event number (4 bytes, big-endian), then the payload."""
    if kind in (BinaryEventTypes.PREVIEW_IMAGE, BinaryEventTypes.UNENCODED_PREVIEW_IMAGE) \
            and isinstance(data, tuple):
        image_type, image = data[0], data[1]
        buffer = io.BytesIO()
        image.save(buffer, format=str(image_type).upper())
        body = struct.pack(">I", 1 if str(image_type).upper() == "JPEG" else 2)
        return struct.pack(">I", BinaryEventTypes.PREVIEW_IMAGE) + body + buffer.getvalue()
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"send_sync({kind}) needs bytes (or (format, PIL image) for previews), "
                        f"got {type(data).__name__}")
    return struct.pack(">I", kind) + bytes(data)


def create_pack_server() -> PackPromptServer:
    """The facade for this process; `PromptServer.instance` from then on."""
    server = PackPromptServer()
    bind_prompt_server(server)
    return server
