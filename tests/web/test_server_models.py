"""A tiny-model workflow over HTTP: ComfyUI's default graph posted in the API format and in the
editor format; an uploaded image used by LoadImage; interrupting a run mid-sampling."""

from __future__ import annotations

import copy
import io
import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from engine.diffusion.checkpoints.writer import write_random_checkpoint
from tests.recorded import data_json
from tests.web.conftest import ServerProcess, start_server
from tests.web.prompt_helpers import submit, wait_history

CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"


def small(api: dict[str, Any], steps: int = 2, size: int = 64) -> dict[str, Any]:
    """The default graph made quick: a few steps on a small latent (the graph is unchanged)."""
    api = copy.deepcopy(api)
    for node in api.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = steps
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=size, height=size)
    return api


def small_editor(workflow: dict[str, Any]) -> dict[str, Any]:
    workflow = copy.deepcopy(workflow)
    for node in workflow["nodes"]:
        if node["type"] == "KSampler":  # widgets: seed, control, steps, cfg, ...
            node["widgets_values"][0] = 777  # not a cache hit of the API-format test
            node["widgets_values"][2] = 2
        if node["type"] == "EmptyLatentImage":
            node["widgets_values"][:2] = [64, 64]
    return workflow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("models") / "base"
    write_random_checkpoint(base / "models" / "checkpoints" / CHECKPOINT, "sd15")
    process = start_server(base)
    yield process
    process.stop()


def saved_png(server: ServerProcess, entry: dict[str, Any]) -> Image.Image:
    image = entry["outputs"]["9"]["images"][0]
    url = (f"{server.url}/view?filename={image['filename']}&type={image['type']}"
           f"&subfolder={image['subfolder']}")
    with urllib.request.urlopen(url, timeout=30) as reply:
        return Image.open(io.BytesIO(reply.read()))


def test_default_workflow_in_api_format_runs(server: ServerProcess) -> None:
    reply = submit(server, small(data_json("compat/default_workflow_api.json")))
    entry = wait_history(server, reply["prompt_id"], timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    png = saved_png(server, entry)
    assert png.size == (64, 64)
    assert json.loads(png.text["prompt"])["3"]["class_type"] == "KSampler"


def test_default_workflow_in_editor_format_runs_and_is_embedded(server: ServerProcess) -> None:
    workflow = small_editor(data_json("compat/default_workflow.json"))
    reply = submit(server, workflow)
    entry = wait_history(server, reply["prompt_id"], timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    png = saved_png(server, entry)
    assert json.loads(png.text["workflow"])["nodes"][0]["type"] in {
        node["type"] for node in workflow["nodes"]}


def test_uploaded_image_feeds_load_image_and_img2img(server: ServerProcess) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"red.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
    body += buffer.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(server.url + "/upload/image", data=body, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        uploaded = json.loads(reply.read())
    api = small(data_json("compat/default_workflow_api.json"))
    api["10"] = {"class_type": "LoadImage", "inputs": {"image": uploaded["name"]}}
    api["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    api["3"]["inputs"].update(latent_image=["11", 0], denoise=0.5)
    entry = wait_history(server, submit(server, api)["prompt_id"], timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]


def test_interrupt_stops_a_run_mid_sampling(server: ServerProcess) -> None:
    api = small(data_json("compat/default_workflow_api.json"), steps=400, size=32)
    api["3"]["inputs"]["seed"] = 12345  # not cached from the earlier tests
    prompt_id = submit(server, api)["prompt_id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        running = server.get_json("/queue")["queue_running"]
        if running and running[0][1] == prompt_id:
            break
        time.sleep(0.05)
    time.sleep(2.0)  # let sampling start
    status, _ = server.post_json("/interrupt", {"prompt_id": prompt_id})
    assert status == 200
    entry = wait_history(server, prompt_id, timeout=120)
    assert entry["status"]["status_str"] == "error"
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
