"""The editor's Templates dialog: Loom serves its template list, each template as an editor
workflow and a thumbnail, and every template converts and validates once the files it names
exist (empty stand-ins are enough to validate; the browser test runs one end to end)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from engine.context import Services
from engine.paths import Paths
from engine.registry import NodeRegistry
from engine.validation import validate_prompt
from engine.workflow import ui_to_api
from nodes import builtin_node_types
from tests.web.inprocess import SyncClient, serving
from web.templates import (
    CANNY_CONTROLNET,
    EXAMPLE_IMAGE,
    LORA,
    SD15,
    SD15_INPAINT,
    SDXL_BASE,
    SDXL_REFINER,
    TEMPLATES,
    UPSCALER,
    build_template,
)

STAND_INS = (("checkpoints", SD15), ("checkpoints", SD15_INPAINT), ("checkpoints", SDXL_BASE),
             ("checkpoints", SDXL_REFINER), ("controlnet", CANNY_CONTROLNET),
             ("loras", LORA), ("upscale_models", UPSCALER))


@pytest.fixture
def base(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    for folder, name in STAND_INS:
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        (base / "models" / folder / name).write_bytes(b"stand-in")
    (base / "input").mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", (64, 64), (200, 120, 40, 255)).save(base / "input" / EXAMPLE_IMAGE)
    return base


@pytest.fixture
def client(base: Path) -> Iterator[SyncClient]:
    with serving(base) as (client, _):
        yield client


@pytest.fixture(scope="module")
def registry() -> NodeRegistry:
    registry = NodeRegistry()
    registry.register_all(builtin_node_types())
    return registry


def test_the_index_lists_every_template_with_its_models(client: SyncClient) -> None:
    (module,) = client.get("/templates/index.json").json()
    assert module["moduleName"] == "default"
    entries = module["templates"]
    assert [entry["name"] for entry in entries] == [template.name for template in TEMPLATES]
    assert all(entry["mediaSubtype"] == "png" and entry["models"] for entry in entries)


def test_a_template_is_served_as_an_editor_workflow(client: SyncClient) -> None:
    workflow = client.get(f"/templates/{TEMPLATES[0].name}.json").json()
    assert {node["type"] for node in workflow["nodes"]} >= {"KSampler", "SaveImage"}
    assert workflow["last_link_id"] == len(workflow["links"])


def test_a_template_thumbnail_is_a_png(client: SyncClient) -> None:
    reply = client.get(f"/templates/{TEMPLATES[0].name}-1.png")
    assert reply.status == 200 and reply.headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(reply.body)).size == (256, 256)


@pytest.mark.parametrize("path", ["index.fr.json", "nothing.json", "nothing-1.png",
                                  "loom-sd15-lora.webp"])
def test_other_template_files_are_not_found(client: SyncClient, path: str) -> None:
    assert client.get(f"/templates/{path}").status == 404


@pytest.mark.parametrize("name", [template.name for template in TEMPLATES])
def test_every_template_converts_and_validates(registry: NodeRegistry, base: Path, name: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    services = Services(Paths.from_base(base))
    api = ui_to_api(build_template(name, registry.object_info(services)),
                    registry.object_info(services))
    with caplog.at_level("INFO", logger="loom.workflow"):
        checked = validate_prompt(api, registry, services)
    assert checked.error is None and checked.node_errors == {}, checked.to_json()
    assert checked.outputs
    assert "has no value" not in caplog.text  # every widget is stated, none defaulted
