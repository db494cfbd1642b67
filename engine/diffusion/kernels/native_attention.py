"""A bf16 flash-attention kernel for x86 CPUs with AVX512-BF16 (kernels/flash_attention_bf16.c),
compiled with the system's C compiler on first use and called through ctypes.

Used by the UNet's attention when the tensors are bf16 on such a CPU; everything else (CUDA,
fp32/fp16, CPUs without native bf16, no compiler) goes through PyTorch's SDPA. The build is
cached by source hash under ~/.cache/loom/kernels (or $XDG_CACHE_HOME/loom/kernels)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from engine.diffusion.memory.devices import cpu_has_native_bf16

logger = logging.getLogger("loom.kernels")

SOURCE = Path(__file__).with_name("flash_attention_bf16.c")
COMPILE_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma",
                 "-fPIC", "-shared", "-pthread", "-std=gnu11")
MAX_HEAD_DIM = 256  # the kernel's register tiles cover head widths up to 16 vectors of 16
STATUS = {1: "out of memory for its scratch buffers", 2: "sizes out of range"}


class KernelBuildError(RuntimeError):
    """The C compiler failed on the kernel source."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "loom" / "kernels"


def build(source: Path = SOURCE, directory: Path | None = None) -> Path:
    """Compile `source` into a shared library named by its hash (reused when present)."""
    text = source.read_bytes()
    digest = hashlib.sha256(text + " ".join(COMPILE_FLAGS).encode()).hexdigest()[:16]
    directory = cache_dir() if directory is None else directory
    target = directory / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise KernelBuildError(f"no C compiler found to build {source.name} (install gcc, or "
                               f"set CC)")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        partial = Path(scratch) / target.name
        try:
            result = subprocess.run([compiler, *COMPILE_FLAGS, str(source), "-o", str(partial)],
                                    capture_output=True, text=True, timeout=300)
        except OSError as error:
            raise KernelBuildError(f"could not run {compiler} on {source.name}: {error}") from error
        if result.returncode != 0:
            raise KernelBuildError(f"{compiler} failed on {source.name}:\n{result.stderr}")
        os.replace(partial, target)  # atomic: a concurrent build of the same hash is harmless
    return target


def _bind(library: ctypes.CDLL) -> ctypes._CFuncPtr:
    function = library.loom_flash_attention_bf16
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    strides = ctypes.POINTER(ctypes.c_int64)
    function.argtypes = [pointer, pointer, pointer, pointer, size, size, size, size, size,
                         strides, strides, strides, strides, ctypes.c_float, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


@functools.cache
def kernel() -> ctypes._CFuncPtr | None:
    """The compiled kernel, or None where this CPU or machine can't run or build it (once per
    process: a failed build is logged, not retried)."""
    if sys.platform != "linux" or not cpu_has_native_bf16():
        return None
    try:
        return _bind(ctypes.CDLL(str(build())))
    except (KernelBuildError, OSError, subprocess.SubprocessError) as error:
        logger.warning("native bf16 attention unavailable, using PyTorch's SDPA: %s", error)
        return None


def supports(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether the kernel takes these (batch, heads, tokens, dim) tensors as they are."""
    tensors = (q, k, v)
    return (all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.dim() == 4
                and t.stride(-1) == 1 and not t.requires_grad for t in tensors)
            and q.shape[-1] == k.shape[-1] == v.shape[-1] <= MAX_HEAD_DIM
            and q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape[2] == v.shape[2]
            and kernel() is not None)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(dim)) v for (B, heads, T, dim) bf16 tensors that `supports` takes;
    returns (B, heads, Tq, dim) as a view of a (B, Tq, heads, dim) tensor, so merging the heads
    afterwards costs no copy."""
    batch, heads, tq, dim = q.shape
    out = torch.empty(batch, tq, heads, dim, dtype=q.dtype).transpose(1, 2)
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (q, k, v, out)]
    status = kernel()(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                      batch, heads, tq, k.shape[2], dim, *strides, dim**-0.5,
                      torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"native attention failed on q {tuple(q.shape)}, k "
                           f"{tuple(k.shape)}: {STATUS.get(status, status)}")
    return out
