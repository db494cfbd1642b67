"""Soak: 50 WebSocket clients queue 500 prompts (10 each) on a `python main.py` in a subprocess;
half way through the server is killed (kill -9) and restarted, and the clients reconnect with
their clientIds. Meanwhile GET /queue is polled for its latency.

Reported: prompts lost (accepted but never in the history), duplicate outputs (files beyond the
one each prompt saves), events delivered to the wrong client, /queue p50/p99 latency, and the
server's RSS growth within each process life (after warm-up to the end). Last line:
`lost_prompts=<n> duplicate_outputs=<n> cross_talk=<n> queue_p99_ms=<x> rss_growth_mb=<x>`."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
TEST_PACK = ROOT / "tests" / "web" / "packs" / "loom_test_nodes.py"


def prompt_for(index: int) -> dict[str, Any]:
    """Saves one unique 8x8 image as soak/p<index>_00001_.png, then a short slow chain."""
    return {"1": {"class_type": "EmptyImage",
                  "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": index}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                        "filename_prefix": f"soak/p{index:03}"}},
            "3": {"class_type": "LoomTestValue", "inputs": {"value": index % 1000}},
            "4": {"class_type": "LoomTestSlow", "inputs": {"value": ["3", 0], "steps": 2,
                                                           "delay": 0.01}},
            "5": {"class_type": "LoomTestShow", "inputs": {"value": ["4", 0], "label": "v"}}}


@dataclass
class Server:
    """A `python main.py` process on a fixed base folder and port."""

    base: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.base / "server.log", "ab")  # noqa: SIM115 - the child keeps it open
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), "--base-directory", str(self.base), "--port",
             str(self.port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def rss_mb(self) -> float:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(60)


@dataclass
class Run:
    """What the clients saw."""

    accepted: dict[str, str] = field(default_factory=dict)  # prompt id -> client id
    received: list[tuple[str, str]] = field(default_factory=list)  # (client id, prompt id)
    queue_ms: list[float] = field(default_factory=list)
    rss: list[tuple[str, float]] = field(default_factory=list)
    down: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)


async def wait_up(session: aiohttp.ClientSession, server: Server) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            async with session.get(server.url + "/prompt") as reply:
                if reply.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the server did not come up; see {server.base / 'server.log'}")


async def listen(session: aiohttp.ClientSession, server: Server, client_id: str,
                 run: Run) -> None:
    """Keep a socket open as `client_id` (reconnecting after the kill) until the run is done."""
    while not run.done.is_set():
        try:
            async with session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
                async for message in ws:
                    if message.type == aiohttp.WSMsgType.TEXT:
                        data = message.json().get("data", {})
                        if isinstance(data, dict) and "prompt_id" in data:
                            run.received.append((client_id, data["prompt_id"]))
        except (aiohttp.ClientError, ConnectionError):
            pass
        await asyncio.sleep(0.2)


async def submit_all(session: aiohttp.ClientSession, server: Server, clients: int,
                     per_client: int, run: Run) -> None:
    async def submit(client: int) -> None:
        for round_ in range(per_client):
            index = client * per_client + round_
            body = {"prompt": prompt_for(index), "client_id": f"soak-{client}"}
            async with session.post(server.url + "/prompt", json=body) as reply:
                reply.raise_for_status()
                run.accepted[(await reply.json())["prompt_id"]] = f"soak-{client}"
    await asyncio.gather(*(submit(client) for client in range(clients)))


async def poll_queue(session: aiohttp.ClientSession, server: Server, run: Run) -> int:
    """Time GET /queue every 50 ms until the run is done; returns the last remaining count."""
    remaining = -1
    while not run.done.is_set():
        started = time.perf_counter()
        try:
            async with session.get(server.url + "/queue") as reply:
                queue = await reply.json()
            run.queue_ms.append((time.perf_counter() - started) * 1000)
            remaining = len(queue["queue_running"]) + len(queue["queue_pending"])
        except (aiohttp.ClientError, ConnectionError):
            pass
        await asyncio.sleep(0.05)
    return remaining


async def remaining(session: aiohttp.ClientSession, server: Server) -> int:
    async with session.get(server.url + "/prompt") as reply:
        return (await reply.json())["exec_info"]["queue_remaining"]


async def wait_remaining(session: aiohttp.ClientSession, server: Server, at_most: int) -> None:
    while True:
        try:
            if await remaining(session, server) <= at_most:
                return
        except (aiohttp.ClientError, ConnectionError):
            pass
        await asyncio.sleep(0.1)


async def soak(server: Server, clients: int, per_client: int, run: Run) -> None:
    total = clients * per_client
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await wait_up(session, server)
        listeners = [asyncio.create_task(listen(session, server, f"soak-{c}", run))
                     for c in range(clients)]
        poller = asyncio.create_task(poll_queue(session, server, run))
        await submit_all(session, server, clients, per_client, run)
        await wait_remaining(session, server, total - total // 10)
        run.rss.append(("first life, warm", server.rss_mb()))
        await wait_remaining(session, server, total // 2)
        run.rss.append(("first life, before kill -9", server.rss_mb()))
        server.kill()
        server.start()
        await wait_up(session, server)
        run.rss.append(("second life, start", server.rss_mb()))
        await wait_remaining(session, server, 0)
        run.rss.append(("second life, end", server.rss_mb()))
        await asyncio.sleep(1)  # the last events reach the clients
        run.done.set()
        for task in listeners:
            task.cancel()
        await asyncio.gather(poller, *listeners, return_exceptions=True)


async def history_ids(server: Server, wanted: list[str]) -> set[str]:
    found = set()
    async with aiohttp.ClientSession() as session:
        for prompt_id in wanted:
            async with session.get(f"{server.url}/history/{prompt_id}") as reply:
                if prompt_id in await reply.json():
                    found.add(prompt_id)
    return found


def duplicate_outputs(output: Path) -> int:
    """Files beyond the one each prompt saves (soak/p<index>_00001_.png)."""
    files = Counter(path.name.split("_")[0] for path in (output / "soak").glob("p*.png"))
    return sum(count - 1 for count in files.values())


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def report(server: Server, run: Run, total: int, seconds: float) -> None:
    lost = set(run.accepted) - asyncio.run(history_ids(server, list(run.accepted)))
    duplicates = duplicate_outputs(server.base / "output")
    cross_talk = sum(1 for client, prompt_id in run.received
                     if run.accepted.get(prompt_id, client) != client)
    growth = max(run.rss[1][1] - run.rss[0][1], run.rss[3][1] - run.rss[2][1])
    print(f"{total} prompts from {len({c for c in run.accepted.values()})} clients in "
          f"{seconds:.1f} s, one kill -9 and restart")
    print(f"accepted {len(run.accepted)}, lost {len(lost)}, duplicate outputs {duplicates}, "
          f"events to the wrong client {cross_talk} (of {len(run.received)})")
    print(f"GET /queue: {len(run.queue_ms)} polls, p50 {percentile(run.queue_ms, 0.5):.1f} ms, "
          f"p99 {percentile(run.queue_ms, 0.99):.1f} ms")
    for label, rss in run.rss:
        print(f"RSS {label:<28} {rss:8.1f} MB")
    log = (server.base / "server.log").read_text(errors="replace")
    print(f"tracebacks in the server log: {log.count('Traceback')}")
    print(f"lost_prompts={len(lost)} duplicate_outputs={duplicates} cross_talk={cross_talk} "
          f"queue_p99_ms={percentile(run.queue_ms, 0.99):.1f} rss_growth_mb={growth:.1f}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--per-client", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        (base / "custom_nodes").mkdir()
        shutil.copy(TEST_PACK, base / "custom_nodes" / TEST_PACK.name)
        server, run = Server(base, free_port()), Run()
        server.start()
        started = time.perf_counter()
        try:
            asyncio.run(soak(server, args.clients, args.per_client, run))
            seconds = time.perf_counter() - started
            report(server, run, args.clients * args.per_client, seconds)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
