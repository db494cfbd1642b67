"""Device and dtype policy, decided once per process (main.py) and passed down.

CUDA: UNet and text encoders fp16, VAE bf16 where the GPU supports it (the SDXL VAE overflows
in fp16), else fp32. CPU with native bf16 (AVX512-BF16 or AMX): UNet and text encoders bf16
(~4x the fp32 matmul rate there), VAE fp32. Other CPUs: fp32. ComfyUI's flags override.

Weights rest on the offload device and are copied to `device` when used (the model manager's
VRAM budget, memory/offload.py): the CPU on CUDA, the GPU itself with --gpu-only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU feature flags (Linux); empty where they cannot be read."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    return bool((cpu_flags() if flags is None else flags) & BF16_CPU_FLAGS)


@dataclass(frozen=True)
class DevicePolicy:
    """Where each model component runs and in which dtype."""

    device: torch.device
    unet_dtype: torch.dtype
    text_dtype: torch.dtype
    vae_dtype: torch.dtype
    reason: str = ""
    offload_device: torch.device = torch.device("cpu")  # where loaders put the weights

    @classmethod
    def decide(cls, *, cpu: bool = False, force_fp32: bool = False, force_fp16: bool = False,
               bf16_unet: bool = False, fp32_vae: bool = False, bf16_vae: bool = False,
               gpu_only: bool = False, cuda_available: bool | None = None,
               cpu_bf16: bool | None = None) -> DevicePolicy:
        """Apply the defaults above, then the flags (names as ComfyUI's)."""
        use_cuda = (torch.cuda.is_available() if cuda_available is None else cuda_available)
        use_cuda = use_cuda and not cpu
        if use_cuda:
            device = torch.device("cuda")
            vae = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
            unet = text = torch.float16
            reason = "CUDA: fp16 UNet and text encoders"
        else:
            device = torch.device("cpu")
            native = cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16
            unet = text = torch.bfloat16 if native else torch.float32
            vae = torch.float32
            reason = ("CPU with native bf16: bf16 UNet and text encoders, fp32 VAE" if native
                      else "CPU without native bf16: fp32 everywhere")
        if force_fp16:
            unet = text = torch.float16
        if bf16_unet:
            unet = torch.bfloat16
        if bf16_vae:
            vae = torch.bfloat16
        if fp32_vae:
            vae = torch.float32
        if force_fp32:
            unet = text = vae = torch.float32
        offload = device if gpu_only else torch.device("cpu")
        return cls(device, unet, text, vae, reason, offload)

    @classmethod
    def from_args(cls, args: Any) -> DevicePolicy:
        """From main.py's parsed flags (missing flags count as not given)."""
        flag = lambda name: bool(getattr(args, name, False))  # noqa: E731
        return cls.decide(cpu=flag("cpu"), force_fp32=flag("force_fp32"),
                          force_fp16=flag("force_fp16"), bf16_unet=flag("bf16_unet"),
                          fp32_vae=flag("fp32_vae"), bf16_vae=flag("bf16_vae"),
                          gpu_only=flag("gpu_only"))

    def describe(self) -> str:
        names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
        resting = ("" if self.offload_device == self.device
                   else f" (weights rest on {self.offload_device})")
        return (f"device {self.device}{resting}, UNet {names.get(self.unet_dtype)}, text "
                f"encoders {names.get(self.text_dtype)}, VAE {names.get(self.vae_dtype)}")
