"""Model-level nodes through the engine: the ModelMerge* and CLIPMergeSimple weight rules (also
when both sides share one network and one carries a LoRA, or differ in a few shapes as an
inpainting model does), bit-exact restore afterwards, and a
CheckpointSave file that loads back with identical tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import Tensor, nn

from engine.diffusion.patches.patching import Patch, patched
from engine.validation import validate_prompt
from tests.model_engine import ModelEngine, node, probed
from tests.test_lora_nodes import write_lora

WEIGHTS = ("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
           "middle_block.0.in_layers.2.bias", "output_blocks.3.1.proj_out.weight", "out.2.weight",
           "time_embed.0.weight")


@pytest.fixture
def engine(tmp_path: Path) -> ModelEngine:
    return ModelEngine(tmp_path)


def weights(module: nn.Module, patches: tuple[Patch, ...], names: tuple[str, ...] = WEIGHTS
            ) -> dict[str, Tensor]:
    """The named weights under `patches`, in fp32 (an fp16 file's weights are held as stored,
    patched ones are fp32: the values are those of the fp32-converted model either way)."""
    with patched(module, patches):
        return {name: module.get_parameter(name).detach().float() for name in names}


def state(module: nn.Module) -> dict[str, Tensor]:
    return {name: tensor.clone() for name, tensor in module.state_dict().items()}


def unchanged(module: nn.Module, before: dict[str, Tensor]) -> bool:
    return all(torch.equal(tensor, before[name]) for name, tensor in module.state_dict().items())


def merged(engine: ModelEngine, merge: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(model1, model2, merged) handles for a merge node fed by two different checkpoints."""
    api = {"1": node("CheckpointLoaderSimple", ckpt_name=engine.checkpoint("sd15", seed=0)),
           "2": node("CheckpointLoaderSimple",
                     ckpt_name=engine.checkpoint("sd15", "other.safetensors", seed=1)),
           "3": merge}
    result, _ = engine.run(probed(api, "1", "2", "3"))
    return tuple(result.values[n][0][0] for n in ("1", "2", "3"))


def close(actual: Tensor, expected: Tensor) -> bool:
    return torch.allclose(actual, expected, atol=1e-6, rtol=0)


def test_model_merge_simple_blends_by_ratio_and_restores(engine: ModelEngine) -> None:
    first, second, blend = merged(engine, node("ModelMergeSimple", model1=["1", 0],
                                               model2=["2", 0], ratio=0.3))
    before1, before2 = state(first.unet), state(second.unet)
    ours, theirs = weights(first.unet, ()), weights(second.unet, ())
    for name, value in weights(blend.unet, blend.patches).items():
        assert close(value, 0.3 * ours[name] + 0.7 * theirs[name]), name
    assert unchanged(first.unet, before1) and unchanged(second.unet, before2)


def test_model_merge_blocks_picks_the_ratio_by_block(engine: ModelEngine) -> None:
    first, second, blend = merged(engine, node("ModelMergeBlocks", model1=["1", 0],
                                               model2=["2", 0], input=0.2, middle=0.5, out=0.9))
    ours, theirs = weights(first.unet, ()), weights(second.unet, ())
    ratios = dict(zip(WEIGHTS, (0.2, 0.5, 0.9, 0.9, 0.2), strict=True))  # time_embed: first
    for name, value in weights(blend.unet, blend.patches).items():
        ratio = ratios[name]
        assert close(value, ratio * ours[name] + (1 - ratio) * theirs[name]), name


def test_model_merge_add_and_subtract(engine: ModelEngine) -> None:
    first, second, added = merged(engine, node("ModelMergeAdd", model1=["1", 0],
                                               model2=["2", 0]))
    ours, theirs = weights(first.unet, ()), weights(second.unet, ())
    for name, value in weights(added.unet, added.patches).items():
        assert close(value, ours[name] + theirs[name]), name
    _, _, difference = merged(engine, node("ModelMergeSubtract", model1=["1", 0],
                                           model2=["2", 0], multiplier=1.5))
    for name, value in weights(difference.unet, difference.patches).items():
        assert close(value, 1.5 * (ours[name] - theirs[name])), name


def test_an_inpainting_model_merges_with_a_plain_one_except_its_wider_input(
        engine: ModelEngine, caplog: pytest.LogCaptureFixture) -> None:
    """As ComfyUI's "inpainting model + (other - base)" recipe: the 9-channel input convolution
    cannot take the 4-channel one's weights, so it is only scaled by model1's factor (and
    named in a warning); every other weight merges."""
    api = {"1": node("CheckpointLoaderSimple",
                     ckpt_name=engine.checkpoint("sd15_inpaint", seed=0)),
           "2": node("CheckpointLoaderSimple", ckpt_name=engine.checkpoint("sd15", seed=1)),
           "3": node("ModelMergeSubtract", model1=["1", 0], model2=["2", 0], multiplier=0.5)}
    with caplog.at_level("WARNING", logger="loom.patches"):
        result, _ = engine.run(probed(api, "1", "2", "3"))
        inpaint, plain, difference = (result.values[n][0][0] for n in ("1", "2", "3"))
        names = (*WEIGHTS, "input_blocks.0.0.weight")
        ours, theirs = weights(inpaint.unet, (), names), weights(plain.unet, (), names)
        values = weights(difference.unet, difference.patches, names)
    assert close(values["input_blocks.0.0.weight"], 0.5 * ours["input_blocks.0.0.weight"])
    for name in WEIGHTS:
        assert close(values[name], 0.5 * (ours[name] - theirs[name])), name
    assert "input_blocks.0.0.weight" in caplog.text


def test_models_of_different_families_are_not_merged(engine: ModelEngine) -> None:
    api = {"1": node("CheckpointLoaderSimple", ckpt_name=engine.checkpoint("sd15")),
           "2": node("CheckpointLoaderSimple", ckpt_name=engine.checkpoint("sd21v")),
           "3": node("ModelMergeSimple", model1=["1", 0], model2=["2", 0], ratio=0.5)}
    checked = engine.executor.execute(*validated(engine, probed(api, "3")))
    assert not checked.ok and "different model families" in str(checked.error)


def validated(engine: ModelEngine, api: dict[str, Any]) -> tuple[Any, list[str]]:
    checked = validate_prompt(api, engine.registry, engine.services)
    return checked.prompt, checked.outputs


def test_merging_a_lora_model_with_its_own_base_halves_the_lora(engine: ModelEngine) -> None:
    ckpt, lora = engine.checkpoint("sd15"), write_lora(engine, "l.safetensors", 1)
    api = {"1": node("CheckpointLoaderSimple", ckpt_name=ckpt),
           "2": node("LoraLoaderModelOnly", model=["1", 0], lora_name=lora, strength_model=1.0),
           "3": node("ModelMergeSimple", model1=["2", 0], model2=["1", 0], ratio=0.5),
           "4": node("ModelMergeSimple", model1=["1", 0], model2=["2", 0], ratio=0.25)}
    result, _ = engine.run(probed(api, "1", "2", "3", "4"))
    base, with_lora, half, quarter = (result.values[n][0][0] for n in ("1", "2", "3", "4"))
    before = state(base.unet)
    plain, full = weights(base.unet, ()), weights(with_lora.unet, with_lora.patches)
    for handle, share in ((half, 0.5), (quarter, 0.75)):
        for name, value in weights(handle.unet, handle.patches).items():
            assert close(value, plain[name] + share * (full[name] - plain[name])), name
    assert unchanged(base.unet, before)


def test_clip_merge_simple_blends_encoders_but_not_logit_scale(engine: ModelEngine) -> None:
    api = {"1": node("CheckpointLoaderSimple", ckpt_name=engine.checkpoint("sdxl_base", seed=0)),
           "2": node("CheckpointLoaderSimple",
                     ckpt_name=engine.checkpoint("sdxl_base", "other.safetensors", seed=1)),
           "3": node("CLIPMergeSimple", clip1=["1", 1], clip2=["2", 1], ratio=0.4),
           "4": node("CLIPTextEncode", text="a cat", clip=["3", 0]),
           "5": node("CLIPTextEncode", text="a cat", clip=["1", 1])}
    result, _ = engine.run(probed(api, "1", "2", "3", "4", "5"))
    clip1, clip2, blend = (result.values[n][1 if n != "3" else 0][0] for n in ("1", "2", "3"))
    names = {"l": ("encoder.layers.0.self_attn.q_proj.weight",),
             "g": ("transformer.resblocks.1.attn.in_proj_weight", "logit_scale")}
    for encoder, keys in names.items():
        ours = weights(clip1.encoders[encoder], (), keys)
        theirs = weights(clip2.encoders[encoder], (), keys)
        for name, value in weights(blend.encoders[encoder], blend.patches[encoder], keys).items():
            expected = ours[name] if name == "logit_scale" else 0.4 * ours[name] + 0.6 * theirs[
                name]
            assert close(value, expected), name
    assert not torch.allclose(result.values["4"][0][0][0][0], result.values["5"][0][0][0][0])


def test_checkpoint_save_writes_a_loadable_checkpoint_with_the_patches_baked_in(
        engine: ModelEngine) -> None:
    ckpt, lora = engine.checkpoint("sd15"), write_lora(engine, "l.safetensors", 1)
    api = {"1": node("CheckpointLoaderSimple", ckpt_name=ckpt),
           "2": node("LoraLoader", model=["1", 0], clip=["1", 1], lora_name=lora,
                     strength_model=0.7, strength_clip=1.3),
           "3": node("CheckpointSave", model=["2", 0], clip=["2", 1], vae=["1", 2],
                     filename_prefix="checkpoints/merged")}
    result, _ = engine.run(probed(api, "1", "2"),
                           extra_data={"extra_pnginfo": {"workflow": {"v": 1}}})
    saved = engine.base / "output" / "checkpoints" / "merged_00001_.safetensors"
    assert result.outputs["3"]["checkpoints"][0]["filename"] == saved.name
    with safe_open(str(saved), "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["workflow"]) == {"v": 1} and "CheckpointSave" in metadata["prompt"]
    model, clip = result.values["2"][0][0], result.values["2"][1][0]
    expected_unet = weights(model.unet, model.patches, tuple(model.unet.state_dict()))
    text = clip.encoders["l"]
    expected_text = weights(text, clip.patches["l"], tuple(text.state_dict()))
    shutil.copy(saved, engine.base / "models" / "checkpoints" / "reloaded.safetensors")
    reloaded, _ = engine.run(probed({"9": node("CheckpointLoaderSimple",
                                               ckpt_name="reloaded.safetensors")}, "9"))
    model2, clip2, vae2 = (reloaded.values["9"][index][0] for index in range(3))
    assert model2.patches == () and clip2.patches == {}
    for expected, module in ((expected_unet, model2.unet), (expected_text, clip2.encoders["l"])):
        current = module.state_dict()
        assert current.keys() == expected.keys()
        assert all(torch.equal(current[name], value) for name, value in expected.items())
    original_vae = result.values["1"][2][0].module.state_dict()
    assert vae2.module.state_dict().keys() == original_vae.keys()
    assert all(torch.equal(vae2.module.state_dict()[k], v) for k, v in original_vae.items())
