"""Loader, text-encode and VAE nodes through the engine, on tiny random checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.validation import validate_prompt
from tests.model_engine import ModelEngine, node, probed


@pytest.fixture
def engine(tmp_path: Path) -> ModelEngine:
    return ModelEngine(tmp_path)


def conditioning(result, node_id: str) -> tuple[torch.Tensor, dict]:
    cond, options = result.values[node_id][0][0][0]
    return cond, options


def test_checkpoint_text_and_vae_nodes_run(engine: ModelEngine) -> None:
    name = engine.checkpoint("sd15")
    api = {"4": node("CheckpointLoaderSimple", ckpt_name=name),
           "6": node("CLIPTextEncode", text="a (red:1.2) fox", clip=["4", 1]),
           "5": node("EmptyLatentImage", width=64, height=48, batch_size=2),
           "8": node("VAEDecode", samples=["5", 0], vae=["4", 2]),
           "10": node("VAEEncode", pixels=["8", 0], vae=["4", 2]),
           "11": node("VAEDecodeTiled", samples=["10", 0], vae=["4", 2], tile_size=64,
                      overlap=32, temporal_size=64, temporal_overlap=8),
           "9": node("SaveImage", images=["11", 0], filename_prefix="t")}
    result, _ = engine.run(probed(api, "6"))
    cond, options = conditioning(result, "6")
    assert cond.shape == (1, 77, 64) and options["pooled_output"].shape == (1, 64)
    assert result.values["8"][0][0].shape == (2, 48, 64, 3)
    assert result.values["10"][0][0]["samples"].shape == (2, 4, 6, 8)
    assert len(result.outputs["9"]["images"]) == 2


def test_clip_skip_changes_the_conditioning(engine: ModelEngine) -> None:
    name = engine.checkpoint("sd15")
    api = {"1": node("CheckpointLoaderSimple", ckpt_name=name),
           "2": node("CLIPSetLastLayer", clip=["1", 1], stop_at_clip_layer=-2),
           "3": node("CLIPTextEncode", text="a cat", clip=["2", 0]),
           "4": node("CLIPTextEncode", text="a cat", clip=["1", 1])}
    result, _ = engine.run(probed(api, "3", "4"))
    assert not torch.allclose(conditioning(result, "3")[0], conditioning(result, "4")[0])


def test_sdxl_text_nodes(engine: ModelEngine) -> None:
    base, refiner = engine.checkpoint("sdxl_base"), engine.checkpoint("sdxl_refiner")
    api = {"1": node("CheckpointLoaderSimple", ckpt_name=base),
           "2": node("CLIPTextEncodeSDXL", clip=["1", 1], width=1024, height=1024, crop_w=0,
                     crop_h=0, target_width=1024, target_height=1024, text_g="a castle",
                     text_l="a castle, oil painting"),
           "3": node("CheckpointLoaderSimple", ckpt_name=refiner),
           "4": node("CLIPTextEncodeSDXLRefiner", ascore=6.0, width=1024, height=1024,
                     text="a castle", clip=["3", 1])}
    result, _ = engine.run(probed(api, "2", "4"))
    cond, options = conditioning(result, "2")
    assert cond.shape == (1, 77, 64 + 128) and options["pooled_output"].shape == (1, 128)
    assert options["target_width"] == 1024
    refined, refiner_options = conditioning(result, "4")
    assert refined.shape[-1] == 128 and refiner_options["aesthetic_score"] == 6.0


def test_a_checkpoint_used_twice_is_loaded_once(engine: ModelEngine) -> None:
    name = engine.checkpoint("sd15")
    (engine.base / "models" / "configs").mkdir(parents=True)
    (engine.base / "models" / "configs" / "v1-inference.yaml").write_text("model: {}\n")
    api = {"1": node("CheckpointLoaderSimple", ckpt_name=name),
           "2": node("CheckpointLoader", config_name="v1-inference.yaml", ckpt_name=name)}
    result, _ = engine.run(probed(api, "1", "2"))
    assert result.values["1"][0][0] is result.values["2"][0][0]
    assert len(engine.services.model_manager.stats()["loaded"]) == 1


def test_edited_checkpoint_file_is_reloaded(engine: ModelEngine) -> None:
    name = engine.checkpoint("sd15", seed=1)
    api = probed({"1": node("CheckpointLoaderSimple", ckpt_name=name)}, "1")
    first, _ = engine.run(api)
    engine.checkpoint("sd15", seed=2)
    second, events = engine.run(api)
    assert "1" in events.executed_nodes()
    assert first.values["1"][0][0] is not second.values["1"][0][0]


def test_missing_checkpoint_is_a_validation_error_naming_the_choices(engine: ModelEngine
                                                                    ) -> None:
    engine.checkpoint("sd15", name="real.safetensors")
    api = probed({"1": node("CheckpointLoaderSimple", ckpt_name="rael.safetensors")}, "1")
    checked = validate_prompt(api, engine.registry, engine.services)
    error = checked.node_errors["1"]["errors"][0]
    assert error["type"] == "value_not_in_list"
    assert "real.safetensors" in error["details"]


def test_unsupported_text_encoder_type_is_refused_at_validation(engine: ModelEngine) -> None:
    folder = engine.base / "models" / "text_encoders"
    folder.mkdir(parents=True)
    (folder / "t5.safetensors").write_bytes(b"")
    api = probed({"1": node("CLIPLoader", clip_name="t5.safetensors", type="sd3")}, "1")
    error = validate_prompt(api, engine.registry, engine.services).node_errors["1"]["errors"][0]
    assert error["type"] == "custom_validation_failed"
    assert "type - text encoder type 'sd3' belongs to a model family Loom does not run" \
        in error["details"]
