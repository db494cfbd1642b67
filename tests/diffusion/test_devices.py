"""The device and dtype policy: defaults per machine, then ComfyUI's flags."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.diffusion.memory.devices import DevicePolicy, cpu_flags, cpu_has_native_bf16


def test_cpu_with_native_bf16_runs_unet_in_bf16_and_vae_in_fp32() -> None:
    policy = DevicePolicy.decide(cuda_available=False, cpu_bf16=True)
    assert policy.device == torch.device("cpu")
    assert (policy.unet_dtype, policy.text_dtype, policy.vae_dtype) == (
        torch.bfloat16, torch.bfloat16, torch.float32)


def test_cpu_without_bf16_runs_fp32() -> None:
    policy = DevicePolicy.decide(cuda_available=False, cpu_bf16=False)
    assert {policy.unet_dtype, policy.text_dtype, policy.vae_dtype} == {torch.float32}


def test_flags_override_the_defaults() -> None:
    assert DevicePolicy.decide(cuda_available=False, cpu_bf16=True,
                               force_fp32=True).unet_dtype == torch.float32
    assert DevicePolicy.decide(cuda_available=False, cpu_bf16=False,
                               bf16_unet=True).unet_holding.storage == torch.bfloat16
    assert DevicePolicy.decide(cuda_available=False, cpu_bf16=True,
                               bf16_vae=True).vae_dtype == torch.bfloat16
    assert DevicePolicy.decide(cuda_available=False, cpu_bf16=False,
                               force_fp16=True).text_dtype == torch.float16


def test_cpu_flag_wins_over_cuda() -> None:
    assert DevicePolicy.decide(cpu=True, cuda_available=True,
                               cpu_bf16=False).device == torch.device("cpu")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse avx512f avx512_bf16\n")
    assert "avx512_bf16" in cpu_flags(info)
    assert cpu_has_native_bf16(cpu_flags(info))
    assert not cpu_has_native_bf16(frozenset({"avx2"}))
    assert cpu_flags(tmp_path / "missing") == frozenset()
