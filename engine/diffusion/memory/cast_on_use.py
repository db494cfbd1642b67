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
except to learn its compute dtype, which it takes from `compute_dtype_of`.

Two kinds of holding. `hold_in` (a flag such as --fp16-unet asked for it) rounds every weight
to the storage dtype: the model *is* the rounded one, and a weight patch (LoRA, merge) is
rounded to the storage dtype too, as ComfyUI does. `compute_in` keeps each weight in the dtype
it was read in, which the loaders pick only where it widens exactly into the compute dtype
(`Holding`: a 16-bit file on a CPU computing fp32): the model is the compute-dtype one, held at
half the bytes, so a patched weight is kept in the compute dtype (`kept_dtype`) and only
patched layers grow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

COMPUTE_DTYPE_ATTRIBUTE = "_loom_compute_dtype"
CAST_UP_ATTRIBUTE = "_loom_cast_up"  # each hooked layer's _CastUp


class _CastUp:
    """The pair of hooks of one module: cast its own parameters up, then put the stored back."""

    def __init__(self, compute: torch.dtype, patches_wide: bool) -> None:
        self.compute = compute
        self.patches_wide = patches_wide  # a patched weight is kept in `compute` (kept_dtype)
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


def casts_only(layer: nn.Module) -> bool:
    """Whether `layer` has no forward hooks but its own cast-up pair, so code that reads its
    parameters cast to the compute dtype instead of calling it computes the same."""
    cast = getattr(layer, CAST_UP_ATTRIBUTE, None)
    before, after = ({cast.before}, {cast.after}) if cast is not None else (set(), set())
    return (set(layer._forward_pre_hooks.values()) <= before
            and set(layer._forward_hooks.values()) <= after)


def widens_exactly(narrow: torch.dtype, wide: torch.dtype) -> bool:
    """Whether every value of floating dtype `narrow` is a value of `wide` (fp16 and bf16 into
    fp32, fp8 into fp16, bf16 and fp32; fp16 into bf16 not), so holding `narrow` and casting up
    to `wide` gives the numbers of converting once."""
    if narrow == wide:
        return True
    floating = narrow.is_floating_point and wide.is_floating_point
    if not floating or narrow.itemsize >= wide.itemsize:
        return False
    small, large = torch.finfo(narrow), torch.finfo(wide)
    return (large.eps <= small.eps and large.max >= small.max
            and large.smallest_normal * large.eps <= small.smallest_normal * small.eps)


@dataclass(frozen=True)
class Holding:
    """How a component's weights are held when computed in `compute`: all in `storage` when a
    flag asks for one (rounded to it); else, with `file_dtype`, each in the dtype the file
    stores it in where that widens exactly into `compute`; else in `compute`."""

    compute: torch.dtype
    storage: torch.dtype | None = None
    file_dtype: bool = False

    def dtype_for(self, stored: torch.dtype) -> torch.dtype:
        """The dtype a floating tensor stored in the file as `stored` is held in."""
        if self.storage is not None:
            return self.storage
        if self.file_dtype and widens_exactly(stored, self.compute):
            return stored
        return self.compute

    def held(self, tensor: Tensor) -> Tensor:
        """`tensor` (as read from a file) in the dtype it is held in; non-floating as it is."""
        return tensor.to(self.dtype_for(tensor.dtype)) if tensor.is_floating_point() else tensor

    def apply(self, module: nn.Module) -> None:
        """Make `module`, whose weights were read with `dtype_for`, compute in `compute`."""
        if self.storage is not None and self.storage != self.compute:
            hold_in(module, self.storage, self.compute)
        elif self.storage is None and any(p.is_floating_point() and p.dtype != self.compute
                                           for p in module.parameters()):
            compute_in(module, self.compute)


def hold_in(module: nn.Module, storage: torch.dtype, compute: torch.dtype) -> None:
    """Store `module`'s floating parameters in `storage` and compute every layer in `compute`
    (a parameter already in `storage` is kept as is: a view of a mapped file stays one); a
    patched weight is rounded to `storage`."""
    with torch.no_grad():
        for param in module.parameters():
            if param.is_floating_point() and param.dtype != storage:
                param.data = param.data.to(storage)
    _hook(module, compute, patches_wide=False)


def compute_in(module: nn.Module, compute: torch.dtype) -> None:
    """Compute every layer of `module` in `compute`, each parameter held in the dtype it has
    (one that widens exactly into `compute`); a patched weight is kept in `compute`."""
    _hook(module, compute, patches_wide=True)


def _hook(module: nn.Module, compute: torch.dtype, patches_wide: bool) -> None:
    for layer in module.modules():
        if any(True for _ in layer.parameters(recurse=False)):
            hooks = _CastUp(compute, patches_wide)
            layer.register_forward_pre_hook(hooks.before)
            layer.register_forward_hook(hooks.after, always_call=True)
            setattr(layer, CAST_UP_ATTRIBUTE, hooks)
    setattr(module, COMPUTE_DTYPE_ATTRIBUTE, compute)


def compute_dtype_of(module: nn.Module, weight: Tensor) -> torch.dtype:
    """The dtype `module` computes in: the one `hold_in` gave it, else its weights' (`weight`)."""
    return getattr(module, COMPUTE_DTYPE_ATTRIBUTE, weight.dtype)


def to_compute(module: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """`module` on `device` computing in `dtype`: a held module (hold_in, compute_in) computing
    in `dtype` keeps its held weights; any other module is cast to `dtype`."""
    if getattr(module, COMPUTE_DTYPE_ATTRIBUTE, None) == dtype:
        return module.to(device=device)
    return module.to(device=device, dtype=dtype)


def kept_dtype(module: nn.Module, name: str, value: Tensor) -> torch.dtype:
    """The dtype a new value (a weight patch) of `module`'s parameter `name`, now `value`, is
    kept in: the compute dtype where the layer holds its file's weights (`compute_in`), else
    the parameter's own dtype."""
    owner = module.get_submodule(name.rpartition(".")[0])
    hooks = getattr(owner, CAST_UP_ATTRIBUTE, None)
    return hooks.compute if hooks is not None and hooks.patches_wide else value.dtype


def casts_on_use(layer: nn.Module) -> bool:
    """Whether `layer`'s parameters are, inside its forward, copies cast for this call only
    (code caching something derived from them must not key on them)."""
    hooks = getattr(layer, CAST_UP_ATTRIBUTE, None)
    return hooks is not None and bool(hooks.stored)
