"""The model-specific merges (one ratio per UNet block), CLIPMergeAdd/Subtract, and the part
savers (CLIPSave, VAESave, ModelSave) whose files load back through the loaders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import Tensor

from engine.diffusion.checkpoints.loader import load_unet_file, load_vae_file
from engine.diffusion.checkpoints.state_files import open_state_file
from engine.diffusion.checkpoints.text_encoders import load_text_encoder_files
from engine.diffusion.memory.devices import DevicePolicy
from engine.diffusion.patches.patching import patched
from engine.diffusion.text.tokenizer import ClipBpe
from nodes.model_merge import ModelMergeSD1, ModelMergeSDXL
from tests.model_engine import ModelEngine, node, probed

FP32 = DevicePolicy.decide(cpu=True, force_fp32=True)


@pytest.fixture
def engine(tmp_path: Path) -> ModelEngine:
    return ModelEngine(tmp_path)


@pytest.fixture(scope="module")
def bpe() -> ClipBpe:
    return ClipBpe.load()


def loaded_pair(engine: ModelEngine, kind: str, merge: dict[str, Any]) -> tuple[Any, ...]:
    api = {"1": node("CheckpointLoaderSimple", ckpt_name=engine.checkpoint(kind, seed=0)),
           "2": node("CheckpointLoaderSimple",
                     ckpt_name=engine.checkpoint(kind, f"other_{kind}.safetensors", seed=1)),
           "3": merge}
    result, _ = engine.run(probed(api, "1", "2", "3"))
    return tuple(result.values[n][0] for n in ("1", "2", "3"))


def unet_params(handle: Any) -> dict[str, Tensor]:
    """The UNet's weights under the handle's patches, in fp32 (held fp16 file weights and fp32
    patched ones alike: the fp32-converted model's values)."""
    with patched(handle.unet, handle.patches) as unet:
        return {name: param.detach().float() for name, param in unet.named_parameters()}


def block_ratios(node_type: Any, **changed: float) -> dict[str, float]:
    return {prefix: changed.get(prefix, 1.0) for prefix in node_type.prefixes}


def test_sd1_block_merge_weights_each_block_by_its_ratio(engine: ModelEngine) -> None:
    ratios = block_ratios(ModelMergeSD1, **{"input_blocks.1.": 0.25, "out.": 0.0})
    first, second, merged = loaded_pair(engine, "sd15", node(
        "ModelMergeSD1", model1=["1", 0], model2=["2", 0], **ratios))
    a, b, m = unet_params(first[0]), unet_params(second[0]), unet_params(merged[0])
    for name, value in m.items():
        if name.startswith("input_blocks.1."):
            assert torch.allclose(value, 0.25 * a[name] + 0.75 * b[name], atol=1e-6), name
        elif name.startswith("out."):
            assert torch.equal(value, b[name]), name
        else:
            assert torch.equal(value, a[name]), name


def test_the_first_ratio_is_the_default_for_weights_no_block_names(engine: ModelEngine) -> None:
    ratios = block_ratios(ModelMergeSDXL, **{"time_embed.": 0.5})
    first, second, merged = loaded_pair(engine, "sdxl_base", node(
        "ModelMergeSDXL", model1=["1", 0], model2=["2", 0], **ratios))
    a, b, m = unet_params(first[0]), unet_params(second[0]), unet_params(merged[0])
    name = "time_embed.0.weight"
    assert torch.allclose(m[name], 0.5 * a[name] + 0.5 * b[name], atol=1e-6)
    assert torch.equal(m["label_emb.0.0.weight"], a["label_emb.0.0.weight"])


def test_block_merge_schemas_list_the_blocks_in_comfyuis_order() -> None:
    assert ModelMergeSD1.prefixes[:4] == ("time_embed.", "label_emb.", "input_blocks.0.",
                                          "input_blocks.1.")
    assert len(ModelMergeSD1.prefixes) == 30 and ModelMergeSD1.prefixes[-1] == "out."
    assert ModelMergeSDXL.prefixes[2] == "input_blocks.0" and len(ModelMergeSDXL.prefixes) == 24


def encoder_params(clip: Any) -> dict[str, Tensor]:
    found = {}
    for name, encoder in clip.encoders.items():
        with patched(encoder, clip.patches.get(name, ())) as module:
            found.update({f"{name}.{key}": value.detach().clone()
                          for key, value in module.named_parameters()})
    return found


@pytest.mark.parametrize("merge, expected", [
    ({"class_type": "CLIPMergeAdd"}, lambda a, b: a + b),
    ({"class_type": "CLIPMergeSubtract", "multiplier": 0.5}, lambda a, b: 0.5 * (a - b))])
def test_clip_add_and_subtract(engine: ModelEngine, merge: dict[str, Any], expected: Any) -> None:
    body = node(merge.pop("class_type"), clip1=["1", 1], clip2=["2", 1], **merge)
    api = {"1": node("CheckpointLoaderSimple", ckpt_name=engine.checkpoint("sd15", seed=0)),
           "2": node("CheckpointLoaderSimple",
                     ckpt_name=engine.checkpoint("sd15", "other.safetensors", seed=1)),
           "3": body}
    result, _ = engine.run(probed(api, "3") | {"p1": node("Probe", value=["1", 1]),
                                               "p2": node("Probe", value=["2", 1])})
    a, b = encoder_params(result.values["1"][1][0]), encoder_params(result.values["2"][1][0])
    for name, value in encoder_params(result.values["3"][0][0]).items():
        assert torch.allclose(value, expected(a[name], b[name]), atol=1e-6), name


def saved(engine: ModelEngine, kind: str, saver: dict[str, Any]) -> tuple[Any, list[Path]]:
    api = {"1": node("CheckpointLoaderSimple", ckpt_name=engine.checkpoint(kind)), "2": saver}
    result, _ = engine.run(probed(api, "1"), extra_data={"extra_pnginfo": {"workflow": {}}})
    output = engine.base / "output"
    parts = tuple(result.values["1"][index][0] for index in range(3))
    return parts, sorted(output.rglob("*.safetensors"))


def test_clip_save_writes_one_hf_file_per_encoder_that_loads_back(engine: ModelEngine,
                                                                  bpe: Any) -> None:
    (model, clip, vae), files = saved(engine, "sdxl_base", node(
        "CLIPSave", clip=["1", 1], filename_prefix="clip/mine"))
    assert [f.name for f in files] == ["mine_clip_g_00001_.safetensors",
                                       "mine_clip_l_00001_.safetensors"]
    with safe_open(files[0], "pt") as handle:
        keys = set(handle.keys())
        assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
        assert "text_projection.weight" in keys and "prompt" in handle.metadata()
    opened = [open_state_file(path).tensors for path in files]
    back = load_text_encoder_files(opened, bpe, architectures=["vit_bigg", "clip_l"],
                                   configs={name: encoder.config for name, encoder
                                            in clip.encoders.items()})
    original = encoder_params(clip)
    for name, value in encoder_params(back).items():
        if not name.endswith("logit_scale"):  # HF text models have none; encoding ignores it
            assert torch.equal(value, original[name]), name


def test_vae_save_loads_back_identical(engine: ModelEngine) -> None:
    (_, _, vae), files = saved(engine, "sd15", node("VAESave", vae=["1", 2],
                                                    filename_prefix="vae/ComfyUI_vae"))
    assert [f.relative_to(engine.base / "output").as_posix() for f in files] == [
        "vae/ComfyUI_vae_00001_.safetensors"]
    back = load_vae_file(open_state_file(files[0]), FP32)
    for name, value in back.module.state_dict().items():
        assert torch.equal(value, vae.module.state_dict()[name]), name


def test_model_save_bakes_patches_in_and_loads_as_a_unet_file(engine: ModelEngine) -> None:
    api = {"1": node("CheckpointLoaderSimple", ckpt_name=engine.checkpoint("sd21v", seed=0)),
           "2": node("CheckpointLoaderSimple",
                     ckpt_name=engine.checkpoint("sd21v", "other.safetensors", seed=1)),
           "3": node("ModelMergeSimple", model1=["1", 0], model2=["2", 0], ratio=0.5),
           "4": node("ModelSave", model=["3", 0], filename_prefix="diffusion_models/ComfyUI")}
    result, _ = engine.run(probed(api, "3"))
    path = engine.base / "output" / "diffusion_models" / "ComfyUI_00001_.safetensors"
    with safe_open(path, "pt") as handle:
        assert all(key.startswith("model.diffusion_model.") or key in ("v_pred",)
                   for key in handle.keys())
    back = load_unet_file(open_state_file(path), FP32)
    assert back.sampling.prediction == "v_prediction"
    expected = unet_params(result.values["3"][0][0])
    for name, value in back.unet.named_parameters():
        assert torch.equal(value, expected[name]), name
