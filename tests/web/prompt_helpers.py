"""Workflows and helpers shared by the prompt, queue and restart end-to-end tests."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from tests.web.conftest import ServerProcess

TEST_PACK = Path(__file__).resolve().parent / "packs" / "loom_test_nodes.py"


def base_with_test_pack(base: Path) -> Path:
    """A base directory whose custom_nodes/ holds the test nodes (LoomTestValue, ...)."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    shutil.copy(TEST_PACK, base / "custom_nodes" / TEST_PACK.name)
    return base


def ws_url(server: ServerProcess) -> str:
    return f"ws://127.0.0.1:{server.port}/ws"


def image_workflow(width: int, prefix: str = "e2e/client") -> dict[str, Any]:
    """EmptyImage 1 -> ImageInvert 2 -> SaveImage 3, and 2 -> PreviewImage 4."""
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": width, "height": 8, "batch_size": 1, "color": 0x336699}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }


def editor_image_workflow(width: int, prefix: str) -> dict[str, Any]:
    """The same graph as `image_workflow` in the editor's format (nodes + links)."""
    def node(node_id: int, kind: str, widgets: list[Any], inputs: list[tuple[str, int]],
             out_links: list[int]) -> dict[str, Any]:
        return {"id": node_id, "type": kind, "pos": [node_id * 200, 0], "size": [200, 100],
                "flags": {}, "order": node_id, "mode": 0, "properties": {},
                "inputs": [{"name": name, "type": "IMAGE", "link": link} for name, link in inputs],
                "outputs": ([{"name": "IMAGE", "type": "IMAGE", "links": out_links}]
                            if out_links else []),
                "widgets_values": widgets}

    return {"id": "3f6a2c1e-0000-4000-8000-000000000001", "revision": 0, "last_node_id": 4,
            "last_link_id": 3,
            "nodes": [node(1, "EmptyImage", [width, 8, 1, 0x336699], [], [1]),
                      node(2, "ImageInvert", [], [("image", 1)], [2, 3]),
                      node(3, "SaveImage", [prefix], [("images", 2)], []),
                      node(4, "PreviewImage", [], [("images", 3)], [])],
            "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"],
                      [3, 2, 0, 4, 0, "IMAGE"]],
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def value_workflow(value: int, middle: str | None = None, **middle_inputs: Any,
                   ) -> dict[str, Any]:
    """LoomTestValue 1 [-> `middle` 2] -> LoomTestShow 3."""
    graph: dict[str, Any] = {
        "1": {"class_type": "LoomTestValue", "inputs": {"value": value}},
        "3": {"class_type": "LoomTestShow",
              "inputs": {"value": ["2" if middle else "1", 0], "label": "value"}},
    }
    if middle:
        graph["2"] = {"class_type": middle, "inputs": {"value": ["1", 0], **middle_inputs}}
    return graph


def slow_workflow(value: int, steps: int, delay: float) -> dict[str, Any]:
    return value_workflow(value, "LoomTestSlow", steps=steps, delay=delay)


def submit(server: ServerProcess, prompt: dict[str, Any], client_id: str | None = None,
           **extra: Any) -> dict[str, Any]:
    """POST /prompt; asserts it was accepted and returns the reply."""
    body: dict[str, Any] = {"prompt": prompt, **extra}
    if client_id is not None:
        body["client_id"] = client_id
    status, reply = server.post_json("/prompt", body)
    assert status == 200, reply
    assert isinstance(reply, dict)
    return reply


def wait_history(server: ServerProcess, prompt_id: str, timeout: float = 60) -> dict[str, Any]:
    """The history entry of `prompt_id`, once it has one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = server.get_json(f"/history/{prompt_id}")
        assert isinstance(entry, dict)
        if prompt_id in entry:
            return entry[prompt_id]
        time.sleep(0.05)
    raise AssertionError(f"{prompt_id} not in the history after {timeout} s:\n{server.log()}")


def wait_running(server: ServerProcess, prompt_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = server.get_json("/queue")
        assert isinstance(queue, dict)
        if [item[1] for item in queue["queue_running"]] == [prompt_id]:
            return
        time.sleep(0.05)
    raise AssertionError(f"{prompt_id} did not start in {timeout} s:\n{server.log()}")


def pending_ids(server: ServerProcess) -> list[str]:
    queue = server.get_json("/queue")
    assert isinstance(queue, dict)
    return [item[1] for item in queue["queue_pending"]]
