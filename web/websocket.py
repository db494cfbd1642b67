"""The /ws endpoint and the hub that delivers messages to connected clients.

Any thread may queue a message (the execution worker does); one task on the event loop sends
them in the order they were queued, so a client sees a prompt's events in order; the loop is
woken once per batch of messages, not once per message (a fast graph queues thousands).
`status` goes to every client, a prompt's execution messages only to the client that submitted
it."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from engine.events import NodeLineage
from web.jsonio import JsonBodyError, dumps, parse
from web.previews import preview_frame, preview_metadata
from web.routing import ApiRoutes

if TYPE_CHECKING:
    from web.server import LoomServer

logger = logging.getLogger("loom.web.websocket")

SEND_TIMEOUT_S = 30.0  # a client that accepts nothing for this long is dropped


@dataclass(frozen=True)
class Outgoing:
    """A queued message: to one client (`sid`) or to all (`sid` None)."""

    sid: str | None
    text: str | None = None
    jpeg: bytes | None = None  # a preview image; framed per client at delivery
    binary: bytes | None = None  # a ready binary frame (custom-node packs' send_sync)
    prompt_id: str = ""
    node_id: str = ""
    lineage: NodeLineage | None = None  # a preview's node, when an expansion added it


class SocketHub:
    """Connected WebSocket clients by client id, and the ordered outbox to them."""

    def __init__(self) -> None:
        self._sockets: dict[str, web.WebSocketResponse] = {}
        self._client_flags: dict[str, dict[str, Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: deque[Outgoing] = deque()
        self._outbox_lock = threading.Lock()
        self._wake_requested = False  # a wake-up of the sender is on its way
        self._ready: asyncio.Event | None = None
        self._sender: asyncio.Task[None] | None = None

    # -- lifetime (event-loop thread) --------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._sender = asyncio.create_task(self._deliver_forever(), name="loom-ws-sender")

    async def stop(self) -> None:
        """Stop delivering and close every socket (so the HTTP server can shut down)."""
        self._loop = None
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
            self._sender = None
        sockets = list(self._sockets.values())
        self._sockets.clear()
        for ws in sockets:
            await ws.close(code=1001, message=b"server shutdown")

    def register(self, sid: str, ws: web.WebSocketResponse) -> None:
        """Deliver `sid`'s messages to `ws`. A second socket with an id already connected takes
        the messages over (ComfyUI's behaviour: a reloaded tab keeps its id); logged, since a
        page that guessed another client's id gets its events the same way."""
        earlier = self._sockets.get(sid)
        if earlier is not None and earlier is not ws and not earlier.closed:
            logger.warning("WebSocket clientId %s connected again while its earlier connection "
                           "is open; the new connection now receives its events", sid)
        self._sockets[sid] = ws

    def unregister(self, sid: str, ws: web.WebSocketResponse) -> None:
        """Forget `ws` (unless the client already reconnected on a new socket)."""
        if self._sockets.get(sid) is ws:
            del self._sockets[sid]
            self._client_flags.pop(sid, None)

    def set_client_flags(self, sid: str, flags: dict[str, Any]) -> None:
        self._client_flags[sid] = flags

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop delivering messages (None while not serving)."""
        return self._loop

    def connected(self) -> list[str]:
        return list(self._sockets)

    # -- queueing (any thread) ----------------------------------------------------------------
    def send(self, kind: str, data: dict[str, Any], sid: str | None) -> None:
        """A JSON message to client `sid`; nobody gets it when `sid` is None."""
        if sid is not None:
            self._queue(Outgoing(sid, text=dumps({"type": kind, "data": data})))

    def broadcast(self, kind: str, data: dict[str, Any]) -> None:
        self._queue(Outgoing(None, text=dumps({"type": kind, "data": data})))

    def send_binary(self, frame: bytes, sid: str | None) -> None:
        """A ready binary frame to client `sid`, or to every client when `sid` is None."""
        self._queue(Outgoing(sid, binary=frame))

    def send_text(self, text: str, sid: str | None) -> None:
        """An encoded message (`{"type", "data"}` JSON) to client `sid`."""
        if sid is not None:
            self._queue(Outgoing(sid, text=text))

    def broadcast_text(self, text: str) -> None:
        self._queue(Outgoing(None, text=text))

    def call_later(self, seconds: float, callback: Callable[[], None]) -> None:
        """Run `callback` on the event loop in `seconds` (dropped when not serving)."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(loop.call_later, seconds, callback)
        except RuntimeError:
            logger.debug("event loop closed; dropped a timer")

    def send_preview(self, jpeg: bytes, prompt_id: str, node_id: str, sid: str | None,
                     lineage: NodeLineage | None = None) -> None:
        if sid is not None:
            self._queue(Outgoing(sid, jpeg=jpeg, prompt_id=prompt_id, node_id=node_id,
                                 lineage=lineage))

    def _queue(self, message: Outgoing) -> None:
        loop = self._loop
        if loop is None:
            return  # not serving (yet, or any more): there is nobody to deliver to
        with self._outbox_lock:
            self._outbox.append(message)
            if self._wake_requested:
                return  # the sender has not taken the batch yet; it takes this one too
            self._wake_requested = True
        try:
            loop.call_soon_threadsafe(self._wake)
        except RuntimeError:
            logger.debug("event loop closed; dropped a %s message", message.sid or "broadcast")

    # -- delivery (event-loop thread) ------------------------------------------------------------
    def _wake(self) -> None:
        if self._ready is not None:
            self._ready.set()

    def _take_batch(self) -> list[Outgoing]:
        with self._outbox_lock:
            batch = list(self._outbox)
            self._outbox.clear()
            self._wake_requested = False
        return batch

    async def _deliver_forever(self) -> None:
        assert self._ready is not None
        while True:
            await self._ready.wait()
            self._ready.clear()
            for message in self._take_batch():
                try:
                    await self._deliver(message)
                except Exception:  # noqa: BLE001 - one bad message must not stop all delivery
                    logger.exception("could not deliver a WebSocket message")

    async def _deliver(self, message: Outgoing) -> None:
        if message.sid is None:
            targets = list(self._sockets.items())
        else:
            ws = self._sockets.get(message.sid)
            targets = [(message.sid, ws)] if ws is not None else []
        for sid, ws in targets:
            payload: str | bytes | None = message.text or message.binary
            if message.jpeg is not None:
                wants_metadata = self._client_flags.get(sid, {}).get("supports_preview_metadata")
                metadata = (preview_metadata(message.prompt_id, message.node_id,
                                             message.lineage)
                            if wants_metadata else None)
                payload = preview_frame(message.jpeg, metadata)
            if payload is not None:
                await self._send_one(sid, ws, payload)

    async def _send_one(self, sid: str, ws: web.WebSocketResponse, payload: str | bytes) -> None:
        if ws.closed:
            self.unregister(sid, ws)
            return
        try:
            send = ws.send_str(payload) if isinstance(payload, str) else ws.send_bytes(payload)
            await asyncio.wait_for(send, SEND_TIMEOUT_S)
        except (ConnectionError, asyncio.TimeoutError, RuntimeError) as exc:
            logger.info("dropping WebSocket client %s: %s", sid, exc or type(exc).__name__)
            self.unregister(sid, ws)
            await ws.close()


def add_routes(routes: ApiRoutes, server: LoomServer) -> None:
    """GET /ws (and /api/ws): the client's event stream."""

    @routes.get("/ws")
    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=30)
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        # Sent before registering, so no broadcast can reach the client ahead of it.
        await ws.send_str(dumps({"type": "status", "data": {**server.status_data(), "sid": sid}}))
        server.sockets.register(sid, ws)
        server.worker.greet(sid)
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    handle_client_message(server, sid, message.data)
                elif message.type == WSMsgType.ERROR:
                    logger.info("WebSocket client %s failed: %s", sid, ws.exception())
        finally:
            server.sockets.unregister(sid, ws)
        return ws


def handle_client_message(server: LoomServer, sid: str, text: str) -> None:
    """Clients send one message: `feature_flags`, answered with the server's flags."""
    try:
        message = parse(text)
    except JsonBodyError as exc:
        logger.info("WebSocket client %s sent unacceptable JSON (%s); ignored", sid, exc)
        return
    if not isinstance(message, dict):
        logger.info("WebSocket client %s sent %r; expected an object", sid, message)
        return
    if message.get("type") == "feature_flags":
        flags = message.get("data")
        server.sockets.set_client_flags(sid, flags if isinstance(flags, dict) else {})
        server.sockets.send("feature_flags", server.feature_flags(), sid)
    else:
        logger.debug("WebSocket client %s sent an unknown message type %r", sid,
                     message.get("type"))
