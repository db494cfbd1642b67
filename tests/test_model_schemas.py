"""The model-level nodes of issue 16 publish ComfyUI 0.8's exact schemas (recorded in
tests/data/compat/object_info_full.json), field by field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodes import builtin_node_types
from tests.schema_parity import schema_differences

FULL = Path(__file__).resolve().parent / "data" / "compat" / "object_info_full.json"
MODEL_NODES = ("UNETLoader", "CLIPLoader", "DualCLIPLoader", "StyleModelApply",
               "UpscaleModelLoader", "ImageUpscaleWithModel", "ModelMergeSD1", "ModelMergeSD2",
               "ModelMergeSDXL", "CLIPMergeAdd", "CLIPMergeSubtract", "CLIPSave", "VAESave",
               "ModelSave", "unCLIPCheckpointLoader", "unCLIPConditioning", "GLIGENLoader",
               "GLIGENTextBoxApply", "LoraSave", "SetUnionControlNetType",
               "ControlNetInpaintingAliMamaApply", "DiffusersLoader")


@pytest.mark.parametrize("class_type", MODEL_NODES)
def test_model_node_schema_matches_comfyui_0_8(class_type: str) -> None:
    recorded = json.loads(FULL.read_text(encoding="utf-8"))[class_type]
    ours = {node_type.schema.name: node_type for node_type in builtin_node_types()}[class_type]
    assert schema_differences(ours.schema, recorded) == []
