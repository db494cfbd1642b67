"""LoraSave ("Extract and Save Lora"): truncated-SVD extraction by ComfyUI's rules, written in
ComfyUI's key format, read back by LoraLoader onto the base model (the round trip), for the
UNet and both SDXL text encoders (OpenCLIP's fused q/k/v and transposed text_projection)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from engine.diffusion.checkpoints.lora_extract import extract_lora, quantile
from engine.diffusion.patches.patching import patched
from tests.model_engine import ModelEngine, node, probed


def reference_extraction(diff: torch.Tensor, rank: int) -> torch.Tensor:
    """U_r diag(S_r) and Vh_r of the flattened difference, both clamped to +-(0.99 quantile
    of their entries); returns their product, shaped as the difference."""
    matrix = diff.flatten(1)
    rank = min(rank, diff.shape[0], diff.shape[1])
    u, s, vh = torch.linalg.svd(matrix)
    up, down = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank]
    limit = torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.99)
    return (up.clamp(-limit, limit) @ down.clamp(-limit, limit)).reshape(diff.shape)


@pytest.mark.parametrize("shape", [(24, 40), (16, 8, 1, 1), (16, 8, 3, 3)])
def test_extraction_is_the_clamped_truncated_svd(shape: tuple[int, ...]) -> None:
    diff = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    up, down = extract_lora(diff, 4)
    assert up.shape[:2] == (shape[0], 4) and down.shape[:2] == (4, shape[1])
    if len(shape) == 4:
        assert up.shape[2:] == (1, 1) and down.shape[2:] == shape[2:]
    product = (up.flatten(1) @ down.flatten(1)).reshape(shape)
    assert torch.allclose(product, reference_extraction(diff, 4), atol=1e-4)


def test_rank_is_capped_by_the_input_channels_not_the_kernel() -> None:
    up, down = extract_lora(torch.randn(16, 4, 3, 3), 64)
    assert up.shape == (16, 4, 1, 1) and down.shape == (4, 4, 3, 3)


def test_quantile_interpolates_like_torch() -> None:
    values = torch.randn(1001)
    for q in (0.0, 0.5, 0.99, 1.0):
        assert torch.allclose(quantile(values, q), torch.quantile(values, q))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> ModelEngine:
    engine = ModelEngine(tmp_path_factory.mktemp("lora_extract"))
    engine.checkpoint("sdxl_base", "tuned.safetensors", seed=0)
    engine.checkpoint("sdxl_base", "base.safetensors", seed=1)
    return engine


def extracted(engine: ModelEngine, lora_type: str, rank: int) -> Path:
    """LoraSave on (tuned - base) for MODEL and CLIP; the file, copied into models/loras."""
    prefix = f"loras/extracted_{lora_type}_{rank}"
    engine.run({
        "tuned": node("CheckpointLoaderSimple", ckpt_name="tuned.safetensors"),
        "base": node("CheckpointLoaderSimple", ckpt_name="base.safetensors"),
        "model_diff": node("ModelMergeSubtract", model1=["tuned", 0], model2=["base", 0],
                           multiplier=1.0),
        "clip_diff": node("CLIPMergeSubtract", clip1=["tuned", 1], clip2=["base", 1],
                          multiplier=1.0),
        "save": node("LoraSave", filename_prefix=prefix, rank=rank, lora_type=lora_type,
                     bias_diff=True, model_diff=["model_diff", 0],
                     text_encoder_diff=["clip_diff", 0])})
    written = engine.base / "output" / f"{prefix}_00001_.safetensors"
    assert written.is_file()
    loras = engine.base / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(written, loras / written.name))


def applied(engine: ModelEngine, lora: Path) -> tuple[Any, Any, Any]:
    """(base + LoRA, tuned, base) as (MODEL, CLIP) pairs, and the loader's UI output."""
    result, listener = engine.run(probed({
        "tuned": node("CheckpointLoaderSimple", ckpt_name="tuned.safetensors"),
        "base": node("CheckpointLoaderSimple", ckpt_name="base.safetensors"),
        "lora": node("LoraLoader", model=["base", 0], clip=["base", 1], lora_name=lora.name,
                     strength_model=1.0, strength_clip=1.0)}, "lora", "tuned", "base"))
    pick = result.values
    return ((pick["lora"][0][0], pick["lora"][1][0]), (pick["tuned"][0][0], pick["tuned"][1][0]),
            (pick["base"][0][0], pick["base"][1][0]))


def weights(module: torch.nn.Module, patches: Any) -> dict[str, torch.Tensor]:
    with patched(module, patches):
        return {name: value.float().clone() for name, value in module.state_dict().items()}


def test_keys_follow_comfyuis_format(engine: ModelEngine) -> None:
    keys = set(load_file(extracted(engine, "standard", 4)))
    assert "diffusion_model.input_blocks.4.1.proj_in.lora_up.weight" in keys
    assert "diffusion_model.input_blocks.4.1.proj_in.diff_b" in keys
    assert "diffusion_model.out.0.diff" in keys  # a norm weight, kept whole with bias_diff
    g = "text_encoders.clip_g.transformer."
    assert f"{g}text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight" in keys
    assert f"{g}text_projection.lora_up.weight" in keys
    assert "text_encoders.clip_l.transformer.text_model.final_layer_norm.diff" in keys
    assert not any(key.endswith(".alpha") for key in keys)


def test_a_full_diff_lora_turns_the_base_into_the_tuned_model(engine: ModelEngine) -> None:
    (model, clip), (tuned, tuned_clip), _ = applied(engine, extracted(engine, "full_diff", 8))
    ours, theirs = weights(model.unet, model.patches), weights(tuned.unet, ())
    assert all(torch.allclose(ours[k], theirs[k], rtol=2e-3, atol=2e-3) for k in theirs)
    for name, encoder in clip.encoders.items():
        ours = weights(encoder, clip.patches[name])
        theirs = weights(tuned_clip.encoders[name], ())
        mismatched = [k for k in theirs if k != "logit_scale"
                      and not torch.allclose(ours[k], theirs[k], rtol=2e-3, atol=2e-3)]
        assert mismatched == []


def test_a_standard_lora_adds_the_extracted_factors_to_the_base(engine: ModelEngine) -> None:
    (model, clip), (tuned, tuned_clip), (base, base_clip) = applied(
        engine, extracted(engine, "standard", 4))
    ours, start = weights(model.unet, model.patches), weights(base.unet, ())
    target = weights(tuned.unet, ())
    for key in ("input_blocks.4.1.proj_in.weight", "input_blocks.1.0.in_layers.2.weight",
                "time_embed.0.weight"):
        expected = reference_extraction(target[key] - start[key], 4)
        assert torch.allclose(ours[key] - start[key], expected, atol=2e-3), key
    g_ours = weights(clip.encoders["g"], clip.patches["g"])
    g_start, g_target = weights(base_clip.encoders["g"], ()), weights(tuned_clip.encoders["g"], ())
    width = g_start["token_embedding.weight"].shape[1]
    q = slice(0, width)  # the q rows of the fused in_proj
    key = "transformer.resblocks.0.attn.in_proj_weight"
    expected = reference_extraction(g_target[key][q] - g_start[key][q], 4)
    assert torch.allclose(g_ours[key][q] - g_start[key][q], expected, atol=2e-3)
    projection = reference_extraction(
        (g_target["text_projection"] - g_start["text_projection"]).t(), 4).t()
    assert torch.allclose(g_ours["text_projection"] - g_start["text_projection"], projection,
                          atol=2e-3)


def test_nothing_connected_writes_nothing(engine: ModelEngine) -> None:
    engine.run({"save": node("LoraSave", filename_prefix="loras/empty", rank=8,
                             lora_type="standard", bias_diff=True)})
    assert not list((engine.base / "output").glob("loras/empty*"))
