"""Clone-and-patch with LoRAs: weights change only inside a patched block, every tensor comes
back bit for bit afterwards (also with two LoRAs stacked, in bf16, and when a later patch
fails), and keys a model cannot use are reported, never dropped silently."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from engine.diffusion.checkpoints.loader import LoadedCheckpoint
from engine.diffusion.networks.unet import UNet, UNetConfig, UNetFamily
from engine.diffusion.patches.lora import apply_lora, lora_patches
from engine.diffusion.patches.lora_keys import unet_paths
from engine.diffusion.patches.patching import patched
from tests.diffusion.lora_testing import (
    assert_state_equal,
    load_tiny,
    randn,
    state_copy,
    weights_under,
    write_lora,
)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> LoadedCheckpoint:
    return load_tiny(tmp_path_factory.mktemp("sd15"), "sd15")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> LoadedCheckpoint:
    return load_tiny(tmp_path_factory.mktemp("sdxl"), "sdxl_base")


def full_lora(unet: UNet, seed: int, rank: int = 2) -> dict[str, Tensor]:
    """A kohya LoCon over every Linear and conv of `unet` (diffusers names)."""
    tensors = {}
    for index, (diffusers, target) in enumerate(unet_paths(unet, unet.config).values()):
        weight = unet.get_parameter(target.weight)
        if weight.ndim < 2 or "norm" in target.weight:
            continue
        name = "lora_unet_" + diffusers.replace(".", "_")
        kernel = tuple(weight.shape[2:])
        tensors[f"{name}.lora_down.weight"] = randn(rank, weight.shape[1], *kernel,
                                                    seed=seed + 2 * index) * 0.1
        tensors[f"{name}.lora_up.weight"] = randn(weight.shape[0], rank, *(1,) * len(kernel),
                                                  seed=seed + 2 * index + 1) * 0.1
    return tensors


def text_lora(seed: int) -> dict[str, Tensor]:
    tensors = {}
    for layer in range(2):
        for index, module in enumerate(("self_attn_q_proj", "self_attn_out_proj", "mlp_fc1")):
            name = f"lora_te_text_model_encoder_layers_{layer}_{module}"
            width_out = 128 if module == "mlp_fc1" else 64
            tensors[f"{name}.lora_down.weight"] = randn(2, 64, seed=seed + 10 * layer + index)
            tensors[f"{name}.lora_up.weight"] = randn(width_out, 2, seed=seed + 50 + index)
    return tensors


def test_two_stacked_loras_unpatch_bit_for_bit(sd15, tmp_path: Path) -> None:
    unet, clip = sd15.model.unet, sd15.clip
    unet_before, text_before = state_copy(unet), state_copy(clip.encoders["l"])
    first = write_lora(tmp_path, full_lora(unet, 0) | text_lora(500), "first")
    second = write_lora(tmp_path, full_lora(unet, 1000) | text_lora(900), "second")
    model, text, _ = apply_lora(sd15.model, clip, first, 0.8, 0.6)
    model, text, _ = apply_lora(model, text, second, -1.3, 2.0)
    assert len(model.patches) == 2 and len(text.patches["l"]) == 2
    name = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    with patched(unet, model.patches):
        assert not torch.equal(unet.get_parameter(name), unet_before[name])
        text.encode("a cat")
    assert_state_equal(unet, unet_before)
    assert_state_equal(clip.encoders["l"], text_before)
    assert sd15.model.patches == () and clip.patches == {}


def test_stacked_loras_add_up(sd15, tmp_path: Path) -> None:
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    files = []
    for index in range(2):
        files.append(write_lora(tmp_path, {f"{name}.lora_up.weight": randn(32, 2, seed=index),
                                           f"{name}.lora_down.weight": randn(2, 32,
                                                                             seed=9 + index)},
                                f"lora{index}"))
    unet = sd15.model.unet
    patches = [lora_patches(lora, unet=unet, encoders={}, strength_model=strength).unet
               for lora, strength in zip(files, (0.5, -2.0), strict=True)]
    weight_name = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    (stacked,) = weights_under(unet, patches, weight_name)
    expected = (unet.get_parameter(weight_name).double()
                + 0.5 * randn(32, 2, seed=0).double() @ randn(2, 32, seed=9).double()
                - 2.0 * randn(32, 2, seed=1).double() @ randn(2, 32, seed=10).double())
    assert torch.allclose(stacked.double(), expected, atol=2e-5, rtol=0)


def test_bf16_weights_round_once_and_restore_exactly(tmp_path: Path) -> None:
    unet = UNet(UNetConfig.tiny(UNetFamily.SD1)).to(torch.bfloat16).requires_grad_(False)
    before = state_copy(unet)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"
    up, down = randn(32, 3, seed=1), randn(3, 128, seed=2)
    lora = write_lora(tmp_path, {f"{name}.lora_up.weight": up.half(),
                                 f"{name}.lora_down.weight": down.half(),
                                 f"{name}.alpha": torch.tensor(1.5, dtype=torch.float16)})
    patch = lora_patches(lora, unet=unet, encoders={}, strength_model=0.9).unet
    weight_name = "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight"
    (patched_weight,) = weights_under(unet, [patch], weight_name)
    delta = 0.5 * up.half().float() @ down.half().float()
    expected = (before[weight_name].float() + 0.9 * delta).to(torch.bfloat16)
    assert patched_weight.dtype == torch.bfloat16
    assert (patched_weight.float() - expected.float()).abs().max() <= 2 ** -7 * expected.abs().max()
    assert_state_equal(unet, before)


class Failing:
    def apply(self, module: nn.Module):
        raise RuntimeError("boom")


def test_a_failing_later_patch_still_restores_the_earlier_ones(sd15, tmp_path: Path) -> None:
    unet = sd15.model.unet
    before = state_copy(unet)
    patch = lora_patches(write_lora(tmp_path, full_lora(unet, 7)), unet=unet, encoders={}).unet
    with pytest.raises(RuntimeError, match="boom"), patched(unet, [patch, Failing()]):
        pass
    assert_state_equal(unet, before)


def test_foreign_keys_are_counted_logged_and_shown(sd15, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    good = "lora_unet_down_blocks_0_attentions_0_proj_out"
    tensors = {f"{good}.lora_up.weight": randn(32, 2, 1, 1, seed=1),
               f"{good}.lora_down.weight": randn(2, 32, 1, 1, seed=2),
               # SDXL-only block, a shape that fits no weight here, and no LoRA tensor at all
               "lora_unet_down_blocks_2_attentions_1_proj_in.lora_up.weight": randn(8, 2, seed=3),
               "lora_unet_down_blocks_2_attentions_1_proj_in.lora_down.weight": randn(2, 8,
                                                                                      seed=4),
               "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": randn(7, 2, seed=5),
               "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": randn(2, 7, seed=6),
               "some_embedding.vector": randn(3, seed=7)}
    lora = write_lora(tmp_path, tensors, "foreign")
    with caplog.at_level(logging.WARNING, logger="loom.lora"):
        result = lora_patches(lora, unet=sd15.model.unet, encoders=sd15.clip.encoders)
    report = result.report
    assert (report.matched, report.unmatched) == (2, 5)
    assert any("some_embedding.vector" in example for example in report.examples)
    assert any("does not fit" in example for example in report.examples)
    assert "5 keys matched nothing" in report.summary()
    assert "foreign.safetensors" in caplog.text and "5 keys matched nothing" in caplog.text


def test_model_only_leaves_text_keys_out_without_calling_them_foreign(sd15, tmp_path: Path,
                                                                    caplog) -> None:
    lora = write_lora(tmp_path, text_lora(3) | full_lora(sd15.model.unet, 4))
    with caplog.at_level(logging.WARNING, logger="loom.lora"):
        model, clip, report = apply_lora(sd15.model, None, lora, 1.0, 0.0)
    assert clip is None and report.unmatched == 0 and report.skipped_text == 12
    assert len(model.patches) == 1 and not caplog.records


def test_an_incomplete_adapter_is_reported(sd15, tmp_path: Path) -> None:
    name = "lora_unet_down_blocks_0_attentions_0_proj_out"
    lora = write_lora(tmp_path, {f"{name}.lora_up.weight": randn(32, 2, 1, 1, seed=1),
                                 f"{name}.alpha": torch.tensor(1.0)})
    report = lora_patches(lora, unet=sd15.model.unet, encoders={}).report
    assert (report.matched, report.unmatched) == (0, 2)
    assert "missing ['down']" in report.examples[0]


def test_sdxl_bigg_lora_restores_in_proj_bit_for_bit(sdxl, tmp_path: Path) -> None:
    encoder = sdxl.clip.encoders["g"]
    before = state_copy(encoder)
    tensors = {}
    for projection in "qkv":
        name = f"lora_te2_text_model_encoder_layers_0_self_attn_{projection}_proj"
        tensors[f"{name}.lora_up.weight"] = randn(128, 2, seed=ord(projection))
        tensors[f"{name}.lora_down.weight"] = randn(2, 128, seed=ord(projection) + 1)
    _, clip, report = apply_lora(None, sdxl.clip, write_lora(tmp_path, tensors), 0.0, 1.0)
    assert report.matched == 6
    plain, changed = sdxl.clip.encode("a castle"), clip.encode("a castle")
    assert not torch.allclose(plain.cond, changed.cond)
    assert_state_equal(encoder, before)
