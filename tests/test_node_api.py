"""The typed node declaration and the ComfyUI schema generated from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.context import Services
from engine.node import (
    Boolean,
    Combo,
    FilesIn,
    Float,
    Hidden,
    Int,
    Link,
    Node,
    NodeSchema,
    Output,
    String,
)
from engine.paths import Paths
from engine.registry import NodeRegistry, RegistryError
from engine.schema import object_info_entry


class Sample(Node):
    schema = NodeSchema(
        "Sample",
        (Link("model", "MODEL", tooltip="the model"),
         Int("seed", 0, min=0, max=2**64 - 1, options={"control_after_generate": True}),
         Float("cfg", 8.0, min=0.0, max=100.0, step=0.1, round=0.01),
         Combo("sampler_name", ("euler", "heun")),
         Combo("ckpt_name", FilesIn("checkpoints")),
         String("text", multiline=True, options={"dynamicPrompts": True}),
         Boolean("flag", True, optional=True),
         Link("extra", "LATENT", optional=True, lazy=True),
         Hidden("prompt", "PROMPT"), Hidden("unique_id", "UNIQUE_ID")),
        (Output("LATENT", tooltip="denoised"), Output("INT", name="count", is_list=True)),
        category="sampling", display_name="Sample It", description="A test node.")


def test_object_info_entry_has_comfyui_shape(tmp_path: Path) -> None:
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "b.safetensors").write_bytes(b"")
    (tmp_path / "models" / "checkpoints" / "a.ckpt").write_bytes(b"")
    (tmp_path / "models" / "checkpoints" / "notes.txt").write_bytes(b"")
    entry = object_info_entry(Sample.schema, Services(Paths.from_base(tmp_path)))
    required = entry["input"]["required"]
    assert list(required) == ["model", "seed", "cfg", "sampler_name", "ckpt_name", "text"]
    assert required["model"] == ["MODEL", {"tooltip": "the model"}]
    assert required["seed"] == ["INT", {"default": 0, "min": 0, "max": 2**64 - 1,
                                        "control_after_generate": True}]
    assert required["cfg"] == ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0,
                                         "step": 0.1, "round": 0.01}]
    assert required["sampler_name"] == [["euler", "heun"], {}]
    assert required["ckpt_name"] == [["a.ckpt", "b.safetensors"], {}]
    assert required["text"] == ["STRING", {"multiline": True, "dynamicPrompts": True}]
    assert entry["input"]["optional"] == {"flag": ["BOOLEAN", {"default": True}],
                                          "extra": ["LATENT", {"lazy": True}]}
    assert entry["input"]["hidden"] == {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"}
    assert entry["input_order"] == {
        "required": ["model", "seed", "cfg", "sampler_name", "ckpt_name", "text"],
        "optional": ["flag", "extra"], "hidden": ["prompt", "unique_id"]}
    assert entry["output"] == ["LATENT", "INT"]
    assert entry["output_name"] == ["LATENT", "count"]
    assert entry["output_is_list"] == [False, True]
    assert entry["output_tooltips"] == ["denoised", ""]
    assert (entry["name"], entry["display_name"], entry["category"]) == (
        "Sample", "Sample It", "sampling")
    assert entry["description"] == "A test node." and entry["output_node"] is False


def test_v3_style_combo_serialises_options_inline() -> None:
    schema = NodeSchema("X", (Combo("mode", ("a", "b"), combo_style="v3"),))
    assert object_info_entry(schema)["input"]["required"]["mode"] == [
        "COMBO", {"multiselect": False, "options": ["a", "b"]}]


def test_duplicate_input_names_are_refused() -> None:
    with pytest.raises(ValueError, match="more than once"):
        NodeSchema("X", (Int("a"), Int("a")))


def test_unknown_hidden_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        Hidden("x", "NOPE")


def test_registry_refuses_a_second_type_with_the_same_name() -> None:
    registry = NodeRegistry()
    registry.register(Sample)
    with pytest.raises(RegistryError, match="already registered"):
        registry.register(Sample)
    assert "Sample" in registry and registry.object_info_for("Nope") is None


def test_registry_object_info_lists_every_type() -> None:
    registry = NodeRegistry()
    registry.register(Sample)
    assert list(registry.object_info()) == ["Sample"]
