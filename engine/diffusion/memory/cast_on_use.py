"""Weights held in a small storage dtype, computed in a wider one: each layer's parameters are
cast up when the layer runs and the wide copies are dropped when it returns.

This is ComfyUI's "manual cast": a bf16, fp16 or fp8 UNet on a CPU without fast math in that
dtype runs in fp32 while holding 2 (or 1) bytes per weight, e.g. SDXL's UNet in 4.8 GB instead
of 9.6 GB. The numbers equal those of fp32 weights rounded to the storage dtype (the cast up is
exact); the cost is one cast of each layer's weights per call, and the extra memory is one
layer's wide weights at a time.

A module is converted in place (`hold_in`): every floating parameter is stored in the storage
dtype and every module owning parameters gets a pre-forward hook that swaps its own parameters'
data for wide copies and a forward hook (run also when the forward raises) that swaps the stored
tensors back. Code that replaces a parameter's data between calls (LoRA patches, eviction,
offloading) sees and writes the stored tensors. A parameter read without calling its module
(`layer.weight` from a parent's forward) is in the storage dtype; the UNet reads none that way
except to learn its compute dtype, which it takes from `compute_dtype_of`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

COMPUTE_DTYPE_ATTRIBUTE = "_loom_compute_dtype"


class _CastUp:
    """The pair of hooks of one module: cast its own parameters up, then put the stored back."""

    def __init__(self, compute: torch.dtype) -> None:
        self.compute = compute
        self.stored: list[tuple[nn.Parameter, Tensor]] = []

    def before(self, module: nn.Module, _args: Any) -> None:
        if self.stored:  # re-entered (a module calling itself): its weights are wide already
            return
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != self.compute:
                self.stored.append((param, param.data))
                param.data = param.data.to(self.compute)

    def after(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        for param, stored in self.stored:
            param.data = stored
        self.stored = []


def hold_in(module: nn.Module, storage: torch.dtype, compute: torch.dtype) -> None:
    """Store `module`'s floating parameters in `storage` and compute every layer in `compute`
    (a parameter already in `storage` is kept as is: a view of a mapped file stays one)."""
    with torch.no_grad():
        for param in module.parameters():
            if param.is_floating_point() and param.dtype != storage:
                param.data = param.data.to(storage)
    for layer in module.modules():
        if any(True for _ in layer.parameters(recurse=False)):
            hooks = _CastUp(compute)
            layer.register_forward_pre_hook(hooks.before)
            layer.register_forward_hook(hooks.after, always_call=True)
    setattr(module, COMPUTE_DTYPE_ATTRIBUTE, compute)


def compute_dtype_of(module: nn.Module, weight: Tensor) -> torch.dtype:
    """The dtype `module` computes in: the one `hold_in` gave it, else its weights' (`weight`)."""
    return getattr(module, COMPUTE_DTYPE_ATTRIBUTE, weight.dtype)
