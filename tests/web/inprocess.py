"""A real LoomServer app served in-process (aiohttp's TestServer) with a synchronous client, so
route tests read like a specification without an async test plugin."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDictProxy
from PIL import Image

from main import build_app, build_parser
from web.server import LoomServer, create_app

HANDSHAKE_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's example: base64 of 16 bytes


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


class SyncClient:
    """Drives one aiohttp TestClient on a private event loop."""

    def __init__(self, app: web.Application) -> None:
        self.loop = asyncio.new_event_loop()
        self.client: TestClient = self.loop.run_until_complete(self._start(app))

    @staticmethod
    async def _start(app: web.Application) -> TestClient:
        client = TestClient(TestServer(app))
        await client.start_server()
        return client

    def request(self, method: str, path: str, **kwargs: Any) -> Reply:
        async def send() -> Reply:
            async with self.client.request(method, path, **kwargs) as reply:
                return Reply(reply.status, reply.headers, await reply.read())
        return self.loop.run_until_complete(send())

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Reply:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Reply:
        return self.request("DELETE", path, **kwargs)

    def websocket_status(self, path: str, **kwargs: Any) -> int:
        """The HTTP status of a WebSocket handshake on `path` (101 when it was accepted)."""
        async def handshake() -> int:
            headers = {"Upgrade": "websocket", "Connection": "Upgrade",
                       "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": HANDSHAKE_KEY,
                       **kwargs.pop("headers", {})}
            async with self.client.request("GET", path, headers=headers, **kwargs) as reply:
                return reply.status
        return self.loop.run_until_complete(handshake())

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()


def make_server(base: Path, *flags: str) -> LoomServer:
    """A LoomServer for `base` built exactly as `python main.py FLAGS` builds it."""
    serve_parser, _ = build_parser()
    args = serve_parser.parse_args(["--base-directory", str(base), *flags])
    app = build_app(args)
    return LoomServer(app.registry, app.services, app.executor, args)


@contextmanager
def serving(base: Path, *flags: str) -> Iterator[tuple[SyncClient, LoomServer]]:
    server = make_server(base, *flags)
    client = SyncClient(create_app(server))
    try:
        yield client, server
    finally:
        client.close()


def png_bytes(size: tuple[int, int] = (8, 6), color: tuple[int, ...] = (255, 0, 0, 128),
              mode: str = "RGBA", text: dict[str, str] | None = None) -> bytes:
    """A small PNG, optionally with text chunks."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
