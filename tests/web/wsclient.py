"""A WebSocket client for end-to-end tests: records every message a Loom server sends, on a
background thread, so a synchronous test can post prompts and then wait for events."""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import aiohttp

Message = dict[str, Any] | bytes


class EventRecorder:
    """Connects to `url` (ws://...) and keeps the messages in arrival order."""

    def __init__(self, url: str, flags: dict[str, Any] | None = None) -> None:
        self.messages: list[Message] = []
        self._changed = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._task = asyncio.run_coroutine_threadsafe(self._start(url, flags), self._loop).result()
        first = self.wait_for(lambda m: isinstance(m, dict) and m.get("type") == "status")
        self.sid: str = first["data"]["sid"]

    async def _start(self, url: str, flags: dict[str, Any] | None) -> asyncio.Task[None]:
        return asyncio.create_task(self._listen(url, flags))

    async def _listen(self, url: str, flags: dict[str, Any] | None) -> None:
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            if flags is not None:
                await ws.send_json({"type": "feature_flags", "data": flags})
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    self._add(message.json())
                elif message.type == aiohttp.WSMsgType.BINARY:
                    self._add(message.data)

    def _add(self, message: Message) -> None:
        with self._changed:
            self.messages.append(message)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[Message], bool], timeout: float = 60,
                 start: int = 0) -> Any:
        """The first message from index `start` on that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for message in self.messages[start:]:
                    if predicate(message):
                        return message
                if self._task.done():
                    self._task.result()  # re-raise why the connection ended
                    raise AssertionError(f"socket closed; got {self.messages}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching message in {timeout} s; got "
                                         f"{self.messages}")
                self._changed.wait(left)

    def wait_end(self, prompt_id: str, timeout: float = 60) -> None:
        """Until `executing {node: null}` of `prompt_id` arrived."""
        self.wait_for(lambda m: is_json(m, "executing") and m["data"]["node"] is None
                      and m["data"]["prompt_id"] == prompt_id, timeout)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if is_json(m, kind)]

    def close(self) -> None:
        async def stop() -> None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> EventRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_json(message: Message, kind: str) -> bool:
    return isinstance(message, dict) and message.get("type") == kind


def summary(message: Message) -> tuple[Any, ...]:
    """A message in short form: (type, what matters for ordering)."""
    if isinstance(message, bytes):
        return ("binary", struct.unpack(">I", message[:4])[0])
    kind, data = message["type"], message["data"]
    if kind == "status":
        return (kind, data["status"]["exec_info"]["queue_remaining"])
    if kind in ("executing", "executed"):
        return (kind, data["node"])
    if kind == "execution_cached":
        return (kind, tuple(data["nodes"]))
    if kind == "progress_state":
        return (kind, tuple((node, state["state"]) for node, state in data["nodes"].items()))
    if kind == "progress":
        return (kind, data["node"], data["value"], data["max"])
    return (kind,)
