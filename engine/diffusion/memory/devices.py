"""Device and dtype policy, decided once per process (main.py) and passed down.

CUDA: UNet and text encoders fp16, VAE bf16 where the GPU supports it (the SDXL VAE overflows
in fp16), else fp32. CPU with native bf16 (AVX512-BF16 or AMX): UNet and text encoders bf16
(~4x the fp32 matmul rate there), VAE fp32. Other CPUs: fp32. ComfyUI's flags override.

Weights a file stores in a dtype that widens exactly into the compute dtype (an fp16 or bf16
file on a CPU computing fp32) are held as stored and cast up layer by layer when they run
(memory/cast_on_use.py `Holding`): the same numbers as converting them at load, at half the
memory. --fp32-unet, --fp32-text-enc and --fp32-vae (ComfyUI: "store in fp32") opt out.

Weights rest on the offload device and are copied to `device` when used (the model manager's
VRAM budget, memory/offload.py): the CPU on CUDA, the GPU itself with --gpu-only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from engine.diffusion.memory.cast_on_use import Holding

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


# ComfyUI's precision flags (argparse dests) -> the dtype they pick
UNET_FLAG_DTYPES = MappingProxyType({"fp32_unet": torch.float32, "fp64_unet": torch.float64,
                    "bf16_unet": torch.bfloat16, "fp16_unet": torch.float16})
UNET_STORAGE_FLAGS = MappingProxyType({
    "fp8_e4m3fn_unet": "float8_e4m3fn", "fp8_e5m2_unet": "float8_e5m2",
    "fp8_e8m0fnu_unet": "float8_e8m0fnu"})
VAE_FLAG_DTYPES = MappingProxyType({"fp16_vae": torch.float16, "fp32_vae": torch.float32,
                   "bf16_vae": torch.bfloat16})
TEXT_STORAGE_FLAGS = MappingProxyType({
    "fp8_e4m3fn_text_enc": "float8_e4m3fn", "fp8_e5m2_text_enc": "float8_e5m2",
    "fp16_text_enc": "float16", "bf16_text_enc": "bfloat16", "fp32_text_enc": "float32"})
# components whose file dtype is held (see above) unless one of these flags is given
FILE_DTYPE_OPT_OUTS = MappingProxyType({"unet": ("fp32_unet", "fp64_unet"),
                                        "text": ("fp32_text_enc",), "vae": ("fp32_vae",)})
PRECISION_FLAGS = ("cpu", "force_fp32", "force_fp16", "cpu_vae", "gpu_only",
                   *UNET_FLAG_DTYPES, *UNET_STORAGE_FLAGS, *VAE_FLAG_DTYPES, *TEXT_STORAGE_FLAGS)


def storage_dtype(name: str) -> torch.dtype:
    """A torch dtype by name; a clear error where this PyTorch lacks it (fp8 variants)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"this PyTorch ({torch.__version__}) has no {name} dtype; drop the "
                         f"flag or weight dtype that asks for it")
    return dtype


@dataclass(frozen=True)
class DevicePolicy:
    """Where each model component runs and in which dtype.

    `*_storage_dtype` (None: as computed) is the dtype weights are held in, ComfyUI's "store
    weights in X" flags (and --bf16-unet/--fp16-unet on a CPU without fast math in X): the
    UNet holds X and casts each layer up to the compute dtype when it runs
    (memory/cast_on_use.py); so do the text encoders. `file_dtype_held` names the components
    ("unet", "text", "vae") whose weights are held in their file's dtype where it widens
    exactly into the compute dtype; `*_holding` is the whole rule for each component."""

    device: torch.device
    unet_dtype: torch.dtype
    text_dtype: torch.dtype
    vae_dtype: torch.dtype
    reason: str = ""
    offload_device: torch.device = torch.device("cpu")  # where loaders put the weights
    vae_device: torch.device | None = None  # None: `device` (--cpu-vae: the CPU)
    unet_storage_dtype: torch.dtype | None = None
    text_storage_dtype: torch.dtype | None = None
    file_dtype_held: frozenset[str] = frozenset()

    @classmethod
    def decide(cls, *, cuda_available: bool | None = None, cpu_bf16: bool | None = None,
               **flags: bool) -> DevicePolicy:
        """Apply the defaults above, then ComfyUI's flags (argparse dests, PRECISION_FLAGS)."""
        unknown = set(flags) - set(PRECISION_FLAGS)
        if unknown:
            raise TypeError(f"unknown precision flags {sorted(unknown)}; known: "
                            f"{', '.join(PRECISION_FLAGS)}")
        use_cuda = (torch.cuda.is_available() if cuda_available is None else cuda_available)
        native = False
        if use_cuda and not flags.get("cpu"):
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
        if flags.get("force_fp16"):
            unet = text = torch.float16
        if flags.get("force_fp32"):
            unet = text = vae = torch.float32
        unet, unet_storage = _unet_dtypes(flags, device, native, unet)
        vae_device = torch.device("cpu") if flags.get("cpu_vae") else None
        vae = _flagged(flags, VAE_FLAG_DTYPES,
                       torch.float32 if vae_device is not None else vae)
        text_storage = _flagged_storage(flags, TEXT_STORAGE_FLAGS)
        if text_storage is not None:  # ComfyUI computes its SD text encoders in fp32
            text = torch.float32
        offload = device if flags.get("gpu_only") else torch.device("cpu")
        held = frozenset(part for part, opt_outs in FILE_DTYPE_OPT_OUTS.items()
                         if not any(flags.get(flag) for flag in opt_outs))
        return cls(device, unet, text, vae, reason, offload, vae_device, unet_storage,
                   text_storage, held)

    @classmethod
    def from_args(cls, args: Any) -> DevicePolicy:
        """From main.py's parsed flags (missing flags count as not given)."""
        return cls.decide(**{name: bool(getattr(args, name, False))
                             for name in PRECISION_FLAGS})

    @property
    def unet_holding(self) -> Holding:
        """How the UNet's weights are held (storage flag, file dtype, or compute dtype)."""
        return Holding(self.unet_dtype, self.unet_storage_dtype, "unet" in self.file_dtype_held)

    @property
    def text_holding(self) -> Holding:
        return Holding(self.text_dtype, self.text_storage_dtype, "text" in self.file_dtype_held)

    @property
    def vae_holding(self) -> Holding:
        return Holding(self.vae_dtype, None, "vae" in self.file_dtype_held)

    @property
    def vae_compute_device(self) -> torch.device:
        return self.vae_device or self.device

    def describe(self) -> str:
        resting = ("" if self.offload_device == self.device
                   else f" (weights rest on {self.offload_device})")
        vae_place = f" on {self.vae_device}" if self.vae_device is not None else ""
        return (f"device {self.device}{resting}, UNet {_dtype_text(self.unet_holding)}, text "
                f"encoders {_dtype_text(self.text_holding)}, VAE "
                f"{_dtype_text(self.vae_holding)}{vae_place}")


def _flagged(flags: dict[str, bool], table: Mapping[str, torch.dtype],
             default: torch.dtype) -> torch.dtype:
    return next((dtype for name, dtype in table.items() if flags.get(name)), default)


def _unet_dtypes(flags: dict[str, bool], device: torch.device, native_bf16: bool,
                 default: torch.dtype) -> tuple[torch.dtype, torch.dtype | None]:
    """(compute, storage) of the UNet. On the CPU, --bf16-unet/--fp16-unet store the weights in
    that dtype and compute in fp32 unless the CPU computes it natively (bf16 with AVX512-BF16
    or AMX; fp16 never), as ComfyUI's manual cast does; elsewhere they set the compute dtype.
    The fp8 flags store in fp8 whatever the compute dtype."""
    compute = _flagged(flags, UNET_FLAG_DTYPES, default)
    storage = _flagged_storage(flags, UNET_STORAGE_FLAGS)
    small = flags.get("bf16_unet") or flags.get("fp16_unet")
    if device.type == "cpu" and small and not (compute == torch.bfloat16 and native_bf16):
        return torch.float32, storage or compute
    return compute, storage


def _flagged_storage(flags: dict[str, bool], table: Mapping[str, str]) -> torch.dtype | None:
    return next((storage_dtype(name) for flag, name in table.items() if flags.get(flag)), None)


def _dtype_text(holding: Holding) -> str:
    name = str(holding.compute).removeprefix("torch.")
    storage = holding.storage
    if storage is not None and storage != holding.compute:
        return f"{name} (weights held in {str(storage).removeprefix('torch.')})"
    if storage is None and holding.file_dtype:
        return f"{name} (narrower file weights held as stored)"
    return name
