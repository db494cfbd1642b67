"""Workflows saved before a widget existed: the missing widgets take their defaults (as ComfyUI's
editor gives them on load), in editor files and in API prompts alike, with a log line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.context import Services
from engine.executor import Executor
from engine.graph import Prompt
from engine.paths import Paths
from engine.registry import NodeRegistry
from engine.validation import validate_prompt
from engine.widget_defaults import fill_missing_widgets
from engine.workflow import ui_to_api
from nodes import builtin_node_types


@pytest.fixture(scope="module")
def registry() -> NodeRegistry:
    registry = NodeRegistry()
    registry.register_all(builtin_node_types())
    return registry


def editor_node(node_id: int, kind: str, widgets: list[Any],
                inputs: list[dict[str, Any]] | None = None,
                outputs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"id": node_id, "type": kind, "mode": 0, "inputs": inputs or [],
            "outputs": outputs or [], "widgets_values": widgets}


@pytest.mark.parametrize(("kind", "widgets", "filled"), [
    ("VAEEncodeForInpaint", [], {"grow_mask_by": 6}),
    ("SDTurboScheduler", [1], {"denoise": 1.0}),
    ("CLIPVisionEncode", [], {"crop": "center"}),
    ("ImageScaleToTotalPixels", ["nearest-exact", 1.0], {"resolution_steps": 1}),
])
def test_an_old_editor_node_gets_the_defaults_of_its_newer_widgets(
        registry: NodeRegistry, kind: str, widgets: list[Any], filled: dict[str, Any]) -> None:
    api = ui_to_api({"nodes": [editor_node(1, kind, widgets)], "links": []},
                    registry.object_info())
    prompt_node = Prompt.parse(api).nodes["1"]
    assert fill_missing_widgets(prompt_node, registry.get(kind).schema) == filled


def test_an_api_prompt_missing_an_optional_widget_gets_its_default(
        registry: NodeRegistry) -> None:
    prompt_node = Prompt.parse({"1": {"class_type": "RegexReplace", "inputs": {
        "string": "a", "regex_pattern": "a", "replace": "b"}}}).nodes["1"]
    filled = fill_missing_widgets(prompt_node, registry.get("RegexReplace").schema)
    assert filled == {"case_insensitive": True, "multiline": False, "dotall": False, "count": 0}


def old_scale_workflow() -> dict[str, Any]:
    """EmptyImage -> ImageScaleToTotalPixels (saved before resolution_steps) -> PreviewImage."""
    nodes = [editor_node(1, "EmptyImage", [64, 32, 1, 0], outputs=[
                 {"name": "IMAGE", "type": "IMAGE", "links": [1]}]),
             editor_node(2, "ImageScaleToTotalPixels", ["bilinear", 0.01],
                         [{"name": "image", "type": "IMAGE", "link": 1}],
                         [{"name": "IMAGE", "type": "IMAGE", "links": [2]}]),
             editor_node(3, "PreviewImage", [], [{"name": "images", "type": "IMAGE", "link": 2}])]
    return {"nodes": nodes, "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"]]}


def test_an_old_editor_workflow_validates_and_runs(registry: NodeRegistry, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    services = Services(Paths.from_base(tmp_path))
    api = ui_to_api(old_scale_workflow(), registry.object_info(services))
    with caplog.at_level("INFO", logger="loom.workflow"):
        checked = validate_prompt(api, registry, services)
    assert checked.error is None, checked.to_json()
    assert "ImageScaleToTotalPixels) has no value for resolution_steps=1" in caplog.text
    result = Executor(registry, services).execute(checked.prompt, checked.outputs)
    assert result.status == "success" and result.outputs["3"]["images"]
