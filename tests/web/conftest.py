"""A real Loom server in a subprocess on a free port, for end-to-end HTTP/WebSocket tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """A running `python main.py` and how to reach it."""

    base: Path
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get_json(self, path: str) -> object:
        with urllib.request.urlopen(self.url + path, timeout=30) as reply:
            return json.loads(reply.read())

    def post_json(self, path: str, body: object) -> tuple[int, object]:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                raw = reply.read()
                return reply.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                return error.code, json.loads(raw)
            except json.JSONDecodeError:
                return error.code, raw.decode(errors="replace")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, kill: bool = False) -> None:
        if self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            self.process.wait(timeout=30)


def start_server(base: Path, *extra: str, port: int | None = None,
                 wait_path: str = "/object_info") -> ServerProcess:
    """Start main.py serving `base` and wait until it answers `wait_path`."""
    port = port or free_port()
    log_path = base / f"server-{port}.log"
    base.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), "--base-directory", str(base), "--port",
             str(port), *extra], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(base, port, process, log_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            server.get_json(wait_path)
            return server
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            time.sleep(0.2)
    server.stop(kill=True)
    raise RuntimeError(f"server did not come up in 120 s:\n{server.log()}")


@pytest.fixture
def loom_server(tmp_path: Path) -> Iterator[ServerProcess]:
    server = start_server(tmp_path / "base")
    yield server
    server.stop()
