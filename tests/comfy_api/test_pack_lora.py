"""A pack applying a LoRA file weight by weight through comfy.lora (as Inspire's
LoraLoaderBlockWeight does) samples and encodes like Loom's LoraLoader; muting a block equals
a file without that block's tensors; a pack's wrapper of comfy.lora.calculate_weight applies
its own patch type while Loom's function applies the rest."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from tests.comfy_api.test_classic_api import base, checkpoint, ksampler, samples
from tests.model_engine import ModelEngine, node, probed

ATTN_IN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # input_blocks.1
PROJ_IN = "lora_unet_down_blocks_0_attentions_0_proj_in"  # input_blocks.1, a full diff + bias
CONV = "lora_unet_down_blocks_0_resnets_1_conv1"  # input_blocks.2, LoCon 3x3
MID = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"  # LoHa
OUT_DORA = "lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_k"  # LDM spelling, DoRA
TEXT_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
INPUT_BLOCK_1 = (ATTN_IN, PROJ_IN)


def randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.3


def lora_tensors() -> dict[str, Tensor]:
    """A tiny SD1.5 file in several formats, each module in a known block."""
    return {
        f"{ATTN_IN}.lora_up.weight": randn(32, 4, seed=1),
        f"{ATTN_IN}.lora_down.weight": randn(4, 64, seed=2),
        f"{ATTN_IN}.alpha": torch.tensor(2.0),
        f"{PROJ_IN}.diff": randn(32, 32, 1, 1, seed=3),
        f"{PROJ_IN}.diff_b": randn(32, seed=4),
        f"{CONV}.lora_down.weight": randn(4, 32, 3, 3, seed=5),
        f"{CONV}.lora_up.weight": randn(32, 4, 1, 1, seed=6),
        **{f"{MID}.hada_{name}": randn(*shape, seed=7 + i) for i, (name, shape) in enumerate(
            [("w1_a", (64, 2)), ("w1_b", (2, 64)), ("w2_a", (64, 2)), ("w2_b", (2, 64))])},
        f"{OUT_DORA}.lora_up.weight": randn(32, 4, seed=11),
        f"{OUT_DORA}.lora_down.weight": randn(4, 64, seed=12),
        f"{OUT_DORA}.dora_scale": randn(32, 1, seed=13).abs() + 1.0,
        f"{TEXT_Q}.lora_up.weight": randn(64, 4, seed=14),
        f"{TEXT_Q}.lora_down.weight": randn(4, 64, seed=15),
    }


def write_lora(engine: ModelEngine, name: str, leave_out: tuple[str, ...] = ()) -> str:
    folder = engine.base / "models" / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {key: value for key, value in lora_tensors().items()
               if not key.startswith(leave_out)}
    save_file(tensors, str(folder / name))
    return name


def lora_graph(engine: ModelEngine, loader: dict[str, Any]) -> dict[str, Any]:
    graph = base(engine)
    clip = ["lora", 1]
    return {**graph, "lora": loader,
            "pos": node("CLIPTextEncode", text="a red fox", clip=clip),
            "neg": node("CLIPTextEncode", text="blurry", clip=clip),
            "sample": ksampler(["lora", 0])}


def block_weight(engine: ModelEngine, muted: str = "", strengths: tuple[float, float] = (0.8, 0.6)
                 ) -> dict[str, Any]:
    return lora_graph(engine, node("PackBlockWeightLora", model=["ckpt", 0], clip=["ckpt", 1],
                                   lora_name=write_lora(engine, "all.safetensors"),
                                   strength_model=strengths[0], strength_clip=strengths[1],
                                   muted_block=muted))


def lora_loader(engine: ModelEngine, name: str, leave_out: tuple[str, ...] = (),
                strengths: tuple[float, float] = (0.8, 0.6)) -> dict[str, Any]:
    return lora_graph(engine, node("LoraLoader", model=["ckpt", 0], clip=["ckpt", 1],
                                   lora_name=write_lora(engine, name, leave_out),
                                   strength_model=strengths[0], strength_clip=strengths[1]))


def encoded(engine: ModelEngine, api: dict[str, Any]) -> Tensor:
    result, _ = engine.run(probed(api, "pos"))
    return result.values["pos"][0][0][0][0]


def test_block_weights_all_one_sample_like_looms_lora_loader(bound: ModelEngine) -> None:
    pack = samples(bound, block_weight(bound), "sample")
    loom = samples(bound, lora_loader(bound, "all.safetensors"), "sample")
    plain = samples(bound, {**base(bound), "sample": ksampler(["ckpt", 0])}, "sample")
    assert torch.allclose(pack, loom, atol=1e-5) and not torch.allclose(pack, plain, atol=1e-3)


def test_block_weights_all_one_encode_like_looms_lora_loader(bound: ModelEngine) -> None:
    pack = encoded(bound, block_weight(bound))
    loom = encoded(bound, lora_loader(bound, "all.safetensors"))
    unpatched = encoded(bound, lora_loader(bound, "all.safetensors", strengths=(0.8, 0.0)))
    assert torch.allclose(pack, loom, atol=1e-6) and not torch.allclose(pack, unpatched,
                                                                           atol=1e-4)


def test_a_muted_block_samples_like_the_file_without_its_tensors(bound: ModelEngine) -> None:
    muted = samples(bound, block_weight(bound, muted="input_blocks.1"), "sample")
    without = samples(bound, lora_loader(bound, "no_in1.safetensors", INPUT_BLOCK_1), "sample")
    full = samples(bound, lora_loader(bound, "all.safetensors"), "sample")
    assert torch.allclose(muted, without, atol=1e-5) and not torch.allclose(muted, full,
                                                                            atol=1e-3)


def own_patch(engine: ModelEngine, as_diff: bool, wrap: bool) -> dict[str, Any]:
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    return {**base(engine), "pack": node("PackOwnPatchSample", model=["ckpt", 0],
                                         positive=["pos", 0], negative=["neg", 0],
                                         latent=["empty", 0], key=key, as_diff=as_diff,
                                         wrap=wrap)}


def test_a_wrapped_calculate_weight_applies_the_packs_own_patch_type(bound: ModelEngine) -> None:
    result, _ = bound.run(probed(own_patch(bound, as_diff=False, wrap=True), "pack"))
    latent, calls = result.values["pack"][0][0]["samples"], result.values["pack"][1][0]
    as_diff = samples(bound, own_patch(bound, as_diff=True, wrap=False), "pack")
    assert calls > 0 and torch.allclose(latent, as_diff, atol=1e-6)


def test_a_wrapper_hands_looms_patch_types_to_looms_function(bound: ModelEngine) -> None:
    result, _ = bound.run(probed(own_patch(bound, as_diff=True, wrap=True), "pack"))
    unwrapped = samples(bound, own_patch(bound, as_diff=True, wrap=False), "pack")
    assert result.values["pack"][1][0] == 0
    assert torch.equal(result.values["pack"][0][0]["samples"], unwrapped)


def test_an_unknown_patch_type_without_its_wrapper_fails_naming_it(bound: ModelEngine) -> None:
    from engine.validation import validate_prompt
    api = probed(own_patch(bound, as_diff=False, wrap=False), "pack")
    checked = validate_prompt(api, bound.registry, bound.services)
    result = bound.executor.execute(checked.prompt, checked.outputs)
    assert result.status == "error"
    assert "patch type 'pack_add'" in result.error["exception_message"]


@pytest.fixture(autouse=True)
def _checkpoint(bound: ModelEngine) -> None:
    checkpoint(bound)


SDXL_TEXT = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (64, 64),
             "lora_te2_text_model_encoder_layers_0_self_attn_k_proj": (128, 128),  # in_proj rows
             "lora_te2_text_projection": (128, 128)}  # stored transposed by Loom


def sdxl_pooled_and_cond(engine: ModelEngine, loader: str, strength_clip: float = 0.7
                         ) -> tuple[Tensor, Tensor]:
    name = "tiny_sdxl_base.safetensors"
    if not (engine.base / "models" / "checkpoints" / name).exists():
        engine.checkpoint("sdxl_base", name)
    tensors = {}
    for seed, (module, (rows, columns)) in enumerate(SDXL_TEXT.items()):
        tensors[f"{module}.lora_up.weight"] = randn(rows, 4, seed=20 + seed)
        tensors[f"{module}.lora_down.weight"] = randn(4, columns, seed=40 + seed)
    (engine.base / "models" / "loras").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(engine.base / "models" / "loras" / "sdxl_text.safetensors"))
    settings = {"model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": "sdxl_text.safetensors",
                "strength_model": 1.0, "strength_clip": strength_clip}
    if loader == "PackBlockWeightLora":
        settings["muted_block"] = ""
    api = {"ckpt": node("CheckpointLoaderSimple", ckpt_name=name),
           "lora": node(loader, **settings),
           "pos": node("CLIPTextEncode", text="a red fox", clip=["lora", 1])}
    result, _ = engine.run(probed(api, "pos"))
    cond, options = result.values["pos"][0][0][0]
    return cond, options["pooled_output"]


def test_sdxl_bigg_qkv_rows_and_projection_encode_like_looms_lora_loader(
        bound: ModelEngine) -> None:
    pack_cond, pack_pooled = sdxl_pooled_and_cond(bound, "PackBlockWeightLora")
    loom_cond, loom_pooled = sdxl_pooled_and_cond(bound, "LoraLoader")
    assert torch.allclose(pack_cond, loom_cond, atol=1e-6)
    assert torch.allclose(pack_pooled, loom_pooled, atol=1e-6)
    plain_cond, plain_pooled = sdxl_pooled_and_cond(bound, "LoraLoader", strength_clip=0.0)
    assert not torch.allclose(pack_cond, plain_cond, atol=1e-4)
    assert not torch.allclose(pack_pooled, plain_pooled, atol=1e-4)
