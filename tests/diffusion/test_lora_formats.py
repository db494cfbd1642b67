"""Each LoRA-family format, written with its real key names against the tiny SD1.5 and SDXL
checkpoints: the patched weight equals W + strength * delta, with the delta computed here
independently from the format's definition (float64, explicit loops or outer products)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from engine.diffusion.checkpoints.loader import LoadedCheckpoint
from engine.diffusion.patches.lora import LoraPatches, lora_patches
from tests.diffusion.lora_testing import load_tiny, randn, weights_under, write_lora

ATOL = 2e-5


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> LoadedCheckpoint:
    return load_tiny(tmp_path_factory.mktemp("sd15"), "sd15")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> LoadedCheckpoint:
    return load_tiny(tmp_path_factory.mktemp("sdxl"), "sdxl_base")


def patches_for(loaded: LoadedCheckpoint, folder: Path, tensors: dict[str, Tensor],
                strength_model: float = 1.0, strength_clip: float = 1.0) -> LoraPatches:
    lora = write_lora(folder, tensors)
    result = lora_patches(lora, unet=loaded.model.unet, encoders=loaded.clip.encoders,
                          strength_model=strength_model, strength_clip=strength_clip)
    assert result.report.unmatched == 0, result.report.summary()
    assert result.report.matched == len(tensors)
    return result


def unet_weight(loaded: LoadedCheckpoint, patches: LoraPatches, name: str) -> tuple[Tensor, Tensor]:
    """(original, patched) float64 copies of one UNet parameter."""
    original = loaded.model.unet.get_parameter(name).detach().double()
    (patched_weight,) = weights_under(loaded.model.unet, [patches.unet], name)
    return original, patched_weight.double()


def text_weight(loaded: LoadedCheckpoint, patches: LoraPatches, encoder: str, name: str
                ) -> tuple[Tensor, Tensor]:
    module = loaded.clip.encoders[encoder]
    original = module.get_parameter(name).detach().double()
    (patched_weight,) = weights_under(module, [patches.text[encoder]], name)
    return original, patched_weight.double()


def close(actual: Tensor, expected: Tensor) -> bool:
    return torch.allclose(actual, expected, atol=ATOL, rtol=0)


# --- kohya / A1111 -----------------------------------------------------------------------------

def test_kohya_linear_lora_scales_by_alpha_over_rank(sd15, tmp_path: Path) -> None:
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    up, down = randn(32, 4, seed=1), randn(4, 64, seed=2)
    patches = patches_for(sd15, tmp_path, {f"{name}.lora_up.weight": up,
                                           f"{name}.lora_down.weight": down,
                                           f"{name}.alpha": torch.tensor(2.0)},
                          strength_model=0.7)
    weight, patched_weight = unet_weight(
        sd15, patches, "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    delta = (2.0 / 4) * up.double() @ down.double()
    assert close(patched_weight, weight + 0.7 * delta)


def test_kohya_conv_1x1_lora_without_alpha_has_scale_one(sd15, tmp_path: Path) -> None:
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    up, down = randn(32, 4, 1, 1, seed=3), randn(4, 32, 1, 1, seed=4)
    patches = patches_for(sd15, tmp_path, {f"{name}.lora_up.weight": up,
                                           f"{name}.lora_down.weight": down})
    weight, patched_weight = unet_weight(sd15, patches, "input_blocks.1.1.proj_in.weight")
    delta = (up[:, :, 0, 0].double() @ down[:, :, 0, 0].double())[:, :, None, None]
    assert close(patched_weight, weight + delta)


def test_kohya_text_encoder_lora_uses_the_clip_strength(sd15, tmp_path: Path) -> None:
    name = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
    up, down = randn(64, 2, seed=5), randn(2, 64, seed=6)
    patches = patches_for(sd15, tmp_path, {f"{name}.lora_up.weight": up,
                                           f"{name}.lora_down.weight": down,
                                           f"{name}.alpha": torch.tensor(1.0)},
                          strength_model=5.0, strength_clip=-0.5)
    assert patches.unet is None
    weight, patched_weight = text_weight(sd15, patches, "l",
                                         "encoder.layers.1.self_attn.q_proj.weight")
    assert close(patched_weight, weight - 0.5 * 0.5 * (up.double() @ down.double()))


def test_locon_3x3_conv_composes_down_kernel_with_1x1_up(sd15, tmp_path: Path) -> None:
    name = "lora_unet_down_blocks_0_resnets_1_conv1"
    up, down = randn(32, 3, 1, 1, seed=7), randn(3, 32, 3, 3, seed=8)
    patches = patches_for(sd15, tmp_path, {f"{name}.lora_up.weight": up,
                                           f"{name}.lora_down.weight": down,
                                           f"{name}.alpha": torch.tensor(1.5)})
    weight, patched_weight = unet_weight(sd15, patches, "input_blocks.2.0.in_layers.2.weight")
    delta = torch.zeros(32, 32, 3, 3, dtype=torch.float64)
    for row in range(3):
        for col in range(3):
            delta[:, :, row, col] = up[:, :, 0, 0].double() @ down[:, :, row, col].double()
    assert close(patched_weight, weight + 0.5 * delta)


def test_locon_upsampler_name_reaches_the_ldm_upsample_conv(sd15, tmp_path: Path) -> None:
    name = "lora_unet_up_blocks_0_upsamplers_0_conv"
    up, down = randn(64, 2, 1, 1, seed=9), randn(2, 64, 3, 3, seed=10)
    patches = patches_for(sd15, tmp_path, {f"{name}.lora_up.weight": up,
                                           f"{name}.lora_down.weight": down})
    weight, patched_weight = unet_weight(sd15, patches, "output_blocks.2.1.conv.weight")
    delta = torch.einsum("or,rihw->oihw", up[:, :, 0, 0].double(), down.double())
    assert close(patched_weight, weight + delta)


def test_locon_tucker_mid_is_up_mid_down(sd15, tmp_path: Path) -> None:
    name = "lora_unet_conv_in"
    up, mid, down = randn(32, 3, 1, 1, seed=11), randn(3, 3, 3, 3, seed=12), randn(3, 4, 1, 1,
                                                                                  seed=13)
    patches = patches_for(sd15, tmp_path, {f"{name}.lora_up.weight": up,
                                           f"{name}.lora_mid.weight": mid,
                                           f"{name}.lora_down.weight": down})
    weight, patched_weight = unet_weight(sd15, patches, "input_blocks.0.0.weight")
    delta = torch.zeros(32, 4, 3, 3, dtype=torch.float64)
    for row in range(3):
        for col in range(3):
            delta[:, :, row, col] = (up[:, :, 0, 0].double() @ mid[:, :, row, col].double()
                                     @ down[:, :, 0, 0].double())
    assert close(patched_weight, weight + delta)


def test_dora_scale_renormalises_each_output_row(sd15, tmp_path: Path) -> None:
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v"
    up, down = randn(64, 2, seed=14), randn(2, 64, seed=15)
    magnitude = randn(64, 1, seed=16).abs() + 0.5
    patches = patches_for(sd15, tmp_path, {f"{name}.lora_up.weight": up,
                                           f"{name}.lora_down.weight": down,
                                           f"{name}.dora_scale": magnitude},
                          strength_model=0.5)
    weight, patched_weight = unet_weight(
        sd15, patches, "middle_block.1.transformer_blocks.0.attn1.to_v.weight")
    merged = weight + up.double() @ down.double()
    rows = merged.pow(2).sum(dim=1, keepdim=True).sqrt()
    decomposed = magnitude.double() * merged / rows
    assert close(patched_weight, weight + 0.5 * (decomposed - weight))


# --- SDXL: LDM-named UNet keys, te1 / te2 and OpenCLIP's stacked q/k/v ---------------------------

def test_sdxl_kohya_ldm_names_and_both_text_encoders(sdxl, tmp_path: Path) -> None:
    unet_name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    te1, te2 = ("lora_te1_text_model_encoder_layers_0_self_attn_v_proj",
                "lora_te2_text_model_encoder_layers_1_mlp_fc1")
    factors = {unet_name: (randn(64, 2, seed=20), randn(2, 64, seed=21)),
               te1: (randn(64, 2, seed=22), randn(2, 64, seed=23)),
               te2: (randn(256, 2, seed=24), randn(2, 128, seed=25))}
    tensors = {}
    for name, (up, down) in factors.items():
        tensors |= {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down}
    patches = patches_for(sdxl, tmp_path, tensors, strength_model=1.0, strength_clip=2.0)
    checks = [
        unet_weight(sdxl, patches, "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight")
        + (1.0, unet_name),
        text_weight(sdxl, patches, "l", "encoder.layers.0.self_attn.v_proj.weight") + (2.0, te1),
        text_weight(sdxl, patches, "g", "transformer.resblocks.1.mlp.c_fc.weight") + (2.0, te2)]
    for weight, patched_weight, strength, name in checks:
        up, down = factors[name]
        assert close(patched_weight, weight + strength * up.double() @ down.double()), name


def test_bigg_q_k_v_loras_change_only_their_rows_of_in_proj(sdxl, tmp_path: Path) -> None:
    width = 128
    tensors, expected_rows = {}, {}
    for slot, projection in enumerate("qkv"):
        prefix = f"text_encoder_2.text_model.encoder.layers.0.self_attn.{projection}_proj"
        down, up = randn(2, width, seed=30 + slot), randn(width, 2, seed=40 + slot)
        tensors |= {f"{prefix}.lora_A.weight": down, f"{prefix}.lora_B.weight": up}
        expected_rows[slot] = up.double() @ down.double()
    bias_name = "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.diff_b"
    tensors[bias_name] = randn(width, seed=50)
    patches = patches_for(sdxl, tmp_path, tensors, strength_clip=0.25)
    weight, patched_weight = text_weight(sdxl, patches, "g",
                                         "transformer.resblocks.0.attn.in_proj_weight")
    bias, patched_bias = text_weight(sdxl, patches, "g",
                                     "transformer.resblocks.0.attn.in_proj_bias")
    expected = weight.clone()
    for slot, delta in expected_rows.items():
        expected[slot * width:(slot + 1) * width] += 0.25 * delta
    assert close(patched_weight, expected)
    expected_bias = bias.clone()
    expected_bias[width:2 * width] += 0.25 * tensors[bias_name].double()
    assert close(patched_bias, expected_bias)


# --- diffusers / PEFT ----------------------------------------------------------------------------

def test_diffusers_peft_and_processor_names(sd15, tmp_path: Path) -> None:
    peft = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    text = "text_encoder.text_model.encoder.layers.0.mlp.fc2"
    processor = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_v_lora"
    factors = {"peft": (randn(32, 4, seed=60), randn(4, 32, seed=61)),
               "text": (randn(64, 4, seed=62), randn(4, 128, seed=63)),
               "processor": (randn(64, 4, seed=64), randn(4, 64, seed=65))}
    tensors = {f"{peft}.lora_B.weight": factors["peft"][0],
               f"{peft}.lora_A.weight": factors["peft"][1],
               f"{text}.lora.up.weight": factors["text"][0],
               f"{text}.lora.down.weight": factors["text"][1],
               f"{processor}.up.weight": factors["processor"][0],
               f"{processor}.down.weight": factors["processor"][1]}
    patches = patches_for(sd15, tmp_path, tensors, strength_model=0.8, strength_clip=1.2)
    checks = {
        "peft": unet_weight(sd15, patches,
                            "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight") + (0.8,),
        "text": text_weight(sd15, patches, "l", "encoder.layers.0.mlp.fc2.weight") + (1.2,),
        "processor": unet_weight(sd15, patches,
                                 "middle_block.1.transformer_blocks.0.attn2.to_v.weight") + (0.8,)}
    for key, (weight, patched_weight, strength) in checks.items():
        up, down = factors[key]
        assert close(patched_weight, weight + strength * up.double() @ down.double()), key


# --- LyCORIS LoHa and LoKr -----------------------------------------------------------------------

def test_loha_is_the_hadamard_product_of_two_low_rank_matrices(sd15, tmp_path: Path) -> None:
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"
    w1a, w1b, w2a, w2b = (randn(64, 4, seed=70), randn(4, 256, seed=71),
                          randn(64, 4, seed=72), randn(4, 256, seed=73))
    patches = patches_for(sd15, tmp_path, {f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b,
                                           f"{name}.hada_w2_a": w2a, f"{name}.hada_w2_b": w2b,
                                           f"{name}.alpha": torch.tensor(2.0)},
                          strength_model=1.5)
    weight, patched_weight = unet_weight(
        sd15, patches, "middle_block.1.transformer_blocks.0.ff.net.2.weight")
    delta = (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double()) * (2.0 / 4)
    assert close(patched_weight, weight + 1.5 * delta)


def tucker_reference(core: Tensor, factor_a: Tensor, factor_b: Tensor) -> Tensor:
    """w[p, r, h, w] = sum_ij core[i, j, h, w] * a[i, p] * b[j, r], one kernel tap at a time."""
    out = torch.zeros(factor_a.shape[1], factor_b.shape[1], *core.shape[2:], dtype=torch.float64)
    for row in range(core.shape[2]):
        for col in range(core.shape[3]):
            out[:, :, row, col] = (factor_a.double().T @ core[:, :, row, col].double()
                                   @ factor_b.double())
    return out


def test_loha_tucker_conv(sd15, tmp_path: Path) -> None:
    name = "lora_unet_up_blocks_1_resnets_0_conv2"
    rank = 3
    parts = {f"{name}.hada_t1": randn(rank, rank, 3, 3, seed=80),
             f"{name}.hada_w1_a": randn(rank, 32, seed=81),
             f"{name}.hada_w1_b": randn(rank, 32, seed=82),
             f"{name}.hada_t2": randn(rank, rank, 3, 3, seed=83),
             f"{name}.hada_w2_a": randn(rank, 32, seed=84),
             f"{name}.hada_w2_b": randn(rank, 32, seed=85)}
    patches = patches_for(sd15, tmp_path, parts)
    weight, patched_weight = unet_weight(sd15, patches, "output_blocks.3.0.out_layers.3.weight")
    first = tucker_reference(parts[f"{name}.hada_t1"], parts[f"{name}.hada_w1_a"],
                             parts[f"{name}.hada_w1_b"])
    second = tucker_reference(parts[f"{name}.hada_t2"], parts[f"{name}.hada_w2_a"],
                              parts[f"{name}.hada_w2_b"])
    assert close(patched_weight, weight + first * second)


def kron_reference(left: Tensor, right: Tensor) -> Tensor:
    """kron(A, B)[i*p + k, j*q + l, ...] = A[i, j] * B[k, l, ...]."""
    left, right = left.double(), right.double()
    rows, cols = left.shape[0] * right.shape[0], left.shape[1] * right.shape[1]
    outer = left[:, None, :, None] if right.ndim == 2 else left[:, None, :, None, None, None]
    product = outer * right[None, :, None, :]  # (a, c, b, d, ...)
    return product.reshape(rows, cols, *right.shape[2:])


def test_lokr_is_a_kronecker_product_scaled_by_the_decomposed_rank(sd15, tmp_path: Path
                                                                   ) -> None:
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj"
    w1, w2a, w2b = randn(4, 2, seed=90), randn(64, 3, seed=91), randn(3, 16, seed=92)
    patches = patches_for(sd15, tmp_path, {f"{name}.lokr_w1": w1, f"{name}.lokr_w2_a": w2a,
                                           f"{name}.lokr_w2_b": w2b,
                                           f"{name}.alpha": torch.tensor(6.0)})
    weight, patched_weight = unet_weight(
        sd15, patches, "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight")
    delta = kron_reference(w1, w2a.double() @ w2b.double()) * (6.0 / 3)
    assert close(patched_weight, weight + delta)


def test_lokr_with_tucker_conv_factor_and_full_factors_ignore_alpha(sd15, tmp_path: Path
                                                                    ) -> None:
    name = "lora_unet_down_blocks_1_resnets_0_conv1"
    rank = 2
    w1 = randn(2, 2, seed=93)
    core, w2a, w2b = randn(rank, rank, 3, 3, seed=94), randn(rank, 32, seed=95), randn(
        rank, 16, seed=96)
    full = "lora_unet_down_blocks_1_resnets_0_time_emb_proj"
    f1, f2 = randn(8, 4, seed=97), randn(8, 32, seed=98)
    patches = patches_for(sd15, tmp_path, {
        f"{name}.lokr_w1": w1, f"{name}.lokr_t2": core, f"{name}.lokr_w2_a": w2a,
        f"{name}.lokr_w2_b": w2b, f"{name}.alpha": torch.tensor(1.0),
        f"{full}.lokr_w1": f1, f"{full}.lokr_w2": f2, f"{full}.alpha": torch.tensor(100.0)})
    weight, patched_weight = unet_weight(sd15, patches, "input_blocks.4.0.in_layers.2.weight")
    delta = kron_reference(w1, tucker_reference(core, w2a, w2b)) * (1.0 / rank)
    assert close(patched_weight, weight + delta)
    weight, patched_weight = unet_weight(sd15, patches, "input_blocks.4.0.emb_layers.1.weight")
    assert close(patched_weight, weight + kron_reference(f1, f2))


# --- full differences ----------------------------------------------------------------------------

def test_full_diff_and_diff_b_are_added_as_they_are(sd15, tmp_path: Path) -> None:
    diff, diff_b = randn(4, 32, 3, 3, seed=100), randn(4, seed=101)
    linear = randn(128, 32, seed=102)
    patches = patches_for(sd15, tmp_path, {"diffusion_model.out.2.diff": diff,
                                           "diffusion_model.out.2.diff_b": diff_b,
                                           "lora_unet_time_embedding_linear_1.diff": linear},
                          strength_model=0.3)
    for name, delta in (("out.2.weight", diff), ("out.2.bias", diff_b),
                        ("time_embed.0.weight", linear)):
        weight, patched_weight = unet_weight(sd15, patches, name)
        assert close(patched_weight, weight + 0.3 * delta.double()), name


def test_dora_scale_of_one_row_renormalises_each_input_column(sd15, tmp_path: Path) -> None:
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    up, down = randn(64, 2, seed=110), randn(2, 64, seed=111)
    magnitude = randn(1, 64, seed=112).abs() + 0.5
    patches = patches_for(sd15, tmp_path, {f"{name}.lora_up.weight": up,
                                           f"{name}.lora_down.weight": down,
                                           f"{name}.dora_scale": magnitude})
    weight, patched_weight = unet_weight(
        sd15, patches, "middle_block.1.transformer_blocks.0.attn1.to_q.weight")
    merged = weight + up.double() @ down.double()
    columns = merged.pow(2).sum(dim=0, keepdim=True).sqrt()
    assert close(patched_weight, magnitude.double() * merged / columns)
