"""Issue 6's combined case: one tiny workflow with two LoRAs and two chained ControlNets on
one checkpoint, end to end through the engine; the shared network is untouched afterwards."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from engine.diffusion.checkpoints.controlnet_writer import write_random_controlnet
from tests.model_engine import ModelEngine, node, probed
from tests.test_controlnet_nodes import workflow
from tests.test_lora_nodes import lora_node, write_lora


@pytest.fixture
def engine(tmp_path) -> ModelEngine:
    engine = ModelEngine(tmp_path)
    engine.checkpoint("sd15", "tiny_sd15.safetensors")
    folder = engine.base / "models" / "controlnet"
    write_random_controlnet(folder / "canny.safetensors", seed=1)
    write_random_controlnet(folder / "depth.safetensors", seed=2)
    (engine.base / "input").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (10, 200, 30)).save(engine.base / "input" / "edges.png")
    write_lora(engine, "style.safetensors", 1)
    write_lora(engine, "detail.safetensors", 11)
    return engine


def with_loras(api: dict[str, Any], strengths: tuple[float, float]) -> dict[str, Any]:
    """Route the checkpoint through two LoraLoaders before the text encoders and KSampler."""
    api = {**api, "lora1": lora_node("style.safetensors", ["ckpt", 0], ["ckpt", 1],
                                     strengths[0], strengths[0]),
           "lora2": lora_node("detail.safetensors", ["lora1", 0], ["lora1", 1],
                              strengths[1], strengths[1])}
    api["pos"] = node("CLIPTextEncode", text="a house by a lake", clip=["lora2", 1])
    api["neg"] = node("CLIPTextEncode", text="blurry", clip=["lora2", 1])
    api["sample"] = {**api["sample"], "inputs": {**api["sample"]["inputs"],
                                                 "model": ["lora2", 0]}}
    return api


def decoded(engine: ModelEngine, api: dict[str, Any]) -> torch.Tensor:
    result, _ = engine.run(probed(api, "decode"))
    return result.values["decode"][0][0]


def test_two_loras_and_two_controlnets_in_one_workflow(engine: ModelEngine) -> None:
    plain = decoded(engine, workflow(None))
    base_weights = {k: v.clone() for k, v in _unet(engine).state_dict().items()}
    full = decoded(engine, with_loras(workflow((1.0, 0.8)), (0.9, 0.6)))
    assert full.shape == plain.shape and torch.isfinite(full).all()
    assert not torch.allclose(full, plain)
    controls_only = decoded(engine, workflow((1.0, 0.8)))
    loras_only = decoded(engine, with_loras(workflow(None), (0.9, 0.6)))
    assert not torch.allclose(full, controls_only) and not torch.allclose(full, loras_only)
    neutral = decoded(engine, with_loras(workflow((0.0, 0.0)), (0.0, 0.0)))
    assert torch.equal(neutral, plain)
    after = _unet(engine).state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_weights.items())


def _unet(engine: ModelEngine) -> torch.nn.Module:
    result, _ = engine.run(probed({"ckpt": node("CheckpointLoaderSimple",
                                                ckpt_name="tiny_sd15.safetensors")}, "ckpt"))
    return result.values["ckpt"][0][0].unet
