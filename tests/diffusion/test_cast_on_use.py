"""Weights held in a storage dtype and computed in a wider one (ComfyUI's manual cast): the UNet
of --bf16-unet/--fp16-unet on a CPU without fast bf16 math, and of the fp8 storage flags,
holds 2 (or 1) bytes per weight and computes in fp32, with the numbers of fp32 weights rounded
to the storage dtype."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from engine.diffusion.checkpoints.loader import load_checkpoint
from engine.diffusion.checkpoints.state_files import open_state_file
from engine.diffusion.checkpoints.writer import write_random_checkpoint
from engine.diffusion.memory.cast_on_use import hold_in
from engine.diffusion.memory.devices import DevicePolicy
from engine.diffusion.memory.model_manager import ModelKey, ModelManager
from engine.diffusion.text.tokenizer import BpeCache

FP32 = DevicePolicy.decide(cpu=True, fp32_unet=True, fp32_text_enc=True)  # converted at load
FP16_HELD = DevicePolicy.decide(cuda_available=False, cpu_bf16=False, fp16_unet=True)
FP8_HELD = DevicePolicy.decide(cuda_available=False, cpu_bf16=False, fp8_e4m3fn_unet=True)


def held_linear() -> torch.nn.Linear:
    layer = torch.nn.Linear(8, 4)
    torch.nn.init.normal_(layer.weight)
    return layer


def test_a_held_layer_computes_in_fp32_with_its_weights_rounded_to_the_storage_dtype() -> None:
    layer = held_linear()
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    hold_in(layer, torch.bfloat16, torch.float32)
    x = torch.randn(3, 8)
    out = layer(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, F.linear(x, weight.bfloat16().float(), bias.bfloat16().float()))


def test_a_held_layer_keeps_its_storage_dtype_between_calls() -> None:
    layer = held_linear()
    hold_in(layer, torch.bfloat16, torch.float32)
    layer(torch.randn(2, 8))
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}


def test_the_stored_weights_come_back_when_the_forward_raises() -> None:
    layer = held_linear()
    hold_in(layer, torch.float16, torch.float32)
    with pytest.raises(RuntimeError):
        layer(torch.randn(2, 5))  # wrong width
    assert {p.dtype for p in layer.parameters()} == {torch.float16}


def unet_output(unet: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, unet.config.context_dim, generator=generator)
    return unet(x, torch.tensor([500.0]), context)


def load_unet(path: Path, policy: DevicePolicy):
    opened = open_state_file(path)
    return opened.tensors, load_checkpoint(opened, policy, BpeCache().get(), with_clip=False,
                                           with_vae=False).model


def test_fp16_unet_flag_on_a_cpu_without_bf16_stores_fp16_and_computes_fp32() -> None:
    assert (FP16_HELD.unet_dtype, FP16_HELD.unet_storage_dtype) == (torch.float32,
                                                                    torch.float16)


def test_bf16_unet_flag_on_a_cpu_with_native_bf16_computes_bf16() -> None:
    policy = DevicePolicy.decide(cuda_available=False, cpu_bf16=True, bf16_unet=True)
    assert (policy.unet_dtype, policy.unet_storage_dtype) == (torch.bfloat16, None)


def test_an_fp16_unet_held_in_fp16_is_the_mapped_file_itself(tmp_path: Path) -> None:
    path = write_random_checkpoint(tmp_path / "half.safetensors", "sd15", dtype=torch.float16)
    opened, model = load_unet(path, FP16_HELD)
    assert model.dtype == model.unet.dtype == torch.float32
    for name, value in model.unet.named_parameters():
        assert value.dtype == torch.float16 and opened.holds(value), name


def test_a_held_unet_gives_the_numbers_of_the_same_weights_in_fp32(tmp_path: Path) -> None:
    path = write_random_checkpoint(tmp_path / "half.safetensors", "sd15", dtype=torch.float16)
    _, held = load_unet(path, FP16_HELD)
    _, wide = load_unet(path, FP32)
    out = unet_output(held.unet)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, unet_output(wide.unet), rtol=0, atol=0)


def test_fp8_storage_reads_the_file_straight_into_fp8_and_keeps_no_file_page(
        tmp_path: Path) -> None:
    path = write_random_checkpoint(tmp_path / "half.safetensors", "sd15", dtype=torch.float16)
    opened, model = load_unet(path, FP8_HELD)
    for name, value in model.unet.named_parameters():
        assert value.dtype == torch.float8_e4m3fn, name
        assert not opened.holds(value), name
    assert unet_output(model.unet).dtype == torch.float32


def test_an_evicted_held_unet_reloads_in_its_storage_dtype(tmp_path: Path) -> None:
    path = write_random_checkpoint(tmp_path / "half.safetensors", "sd15", dtype=torch.float16)
    manager = ModelManager(FP16_HELD)
    model = manager.load(ModelKey.for_file(path, "unet"), lambda: load_unet(path, FP16_HELD)[1])
    before = unet_output(model.unet)
    manager.free()
    assert torch.equal(unet_output(model.unet), before)
    assert {p.dtype for p in model.unet.parameters()} == {torch.float16}


def load_text_encoders(path: Path, policy: DevicePolicy):
    opened = open_state_file(path)
    loaded = load_checkpoint(opened, policy, BpeCache().get(), with_vae=False)
    return opened.tensors, loaded.clip.encoders


def test_text_encoders_held_in_fp16_are_the_mapped_file_and_give_the_fp32_numbers(
        tmp_path: Path) -> None:
    path = write_random_checkpoint(tmp_path / "xl.safetensors", "sdxl_base",
                                   dtype=torch.float16)
    opened, held = load_text_encoders(
        path, DevicePolicy.decide(cpu=True, fp16_text_enc=True))
    _, wide = load_text_encoders(path, FP32)
    tokens = torch.randint(0, 1000, (1, 77), generator=torch.Generator().manual_seed(0))
    tokens[0, 10:] = 49407  # end of text
    for name, encoder in held.items():
        assert all(p.dtype == torch.float16 and opened.holds(p) for p in encoder.parameters())
        out, expected = encoder(tokens), wide[name](tokens)
        torch.testing.assert_close(out.hidden, expected.hidden, rtol=0, atol=0)
        torch.testing.assert_close(out.pooled, expected.pooled, rtol=0, atol=0)
