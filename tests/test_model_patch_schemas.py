"""The model-patch, guidance, hooks and conditioning-extras nodes (issue 16) publish ComfyUI
0.8's exact schemas: each is compared field by field with its entry in the recorded full
/object_info (tests/data/compat/object_info_full.json, a copy of ../shared/compat's)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from engine.node import Node
from nodes import conditioning_extras, hooks, model_guidance, model_unet_patches
from tests.schema_parity import schema_differences

FULL_RECORDING = Path(__file__).resolve().parent / "data" / "compat" / "object_info_full.json"
NODE_TYPES: tuple[type[Node], ...] = (*model_guidance.NODE_TYPES, *model_unet_patches.NODE_TYPES,
                                      *conditioning_extras.NODE_TYPES, *hooks.NODE_TYPES)


@cache
def recorded() -> dict[str, Any]:
    return json.loads(FULL_RECORDING.read_text(encoding="utf-8"))


@pytest.mark.parametrize("node_type", NODE_TYPES, ids=lambda t: t.schema.name)
def test_schema_matches_comfyui(node_type: type[Node]) -> None:
    entry = recorded().get(node_type.schema.name)
    assert entry is not None, f"{node_type.schema.name!r} is not a ComfyUI 0.8 node"
    problems = schema_differences(node_type.schema, entry)
    assert not problems, "\n".join(problems)
