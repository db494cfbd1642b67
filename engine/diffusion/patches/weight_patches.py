"""Weight patches (the patches/patching.py protocol): LoRA-style deltas and model merges.

Both compute each patched parameter in float32 from the current weight, round it once to the
dtype the parameter keeps new values in (its own, or the compute dtype of a layer holding its
file's narrower weights: memory/cast_on_use.py `kept_dtype`, so a LoRA on an fp16 file computed
in fp32 gives the fp32 model's numbers), and swap it in as the parameter's data; undo swaps the
original tensor back.
Nothing is written into the shared weights (which may be a read-only memory map of the model
file), and the restore is exact because the very same tensor object comes back."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor, nn

from engine.diffusion.memory.cast_on_use import kept_dtype
from engine.diffusion.patches.patching import Patch, Undo, patched

logger = logging.getLogger("loom.patches")

# current float32 weight (or row slice; must not be modified) -> float32 delta of its numel
DeltaFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class ParamDelta:
    """strength * delta added to parameter `param` (rows [start, stop) of it when `rows`)."""

    param: str
    delta: Tensor | DeltaFn
    strength: float
    rows: tuple[int, int] | None = None


def swap_in(params: Sequence[tuple[nn.Parameter, Tensor]]) -> Undo:
    """Point each parameter at its new tensor; the undo points them back at the old ones."""
    originals = [(param, param.data) for param, _ in params]
    for param, value in params:
        param.data = value

    def undo() -> None:
        for param, original in reversed(originals):
            param.data = original

    return undo


def _region(work: Tensor, rows: tuple[int, int] | None, param: str) -> Tensor:
    if rows is None:
        return work
    start, stop = rows
    if not 0 <= start < stop <= work.shape[0]:
        raise ValueError(f"rows {rows} lie outside {param!r} of shape {tuple(work.shape)}")
    return work[start:stop]


def patched_value(name: str, original: Tensor, entries: Sequence[ParamDelta],
                  dtype: torch.dtype | None = None) -> Tensor:
    """original + sum of strength * delta, computed in float32, rounded once to `dtype`
    (default: the original's)."""
    work = original.to(torch.float32, copy=True)
    with torch.no_grad():
        for entry in entries:
            region = _region(work, entry.rows, name)
            delta = entry.delta if isinstance(entry.delta, Tensor) else entry.delta(region)
            if delta.numel() != region.numel():
                raise ValueError(f"a delta of shape {tuple(delta.shape)} does not fit {name!r} "
                                 f"(shape {tuple(region.shape)}); the patch is for another "
                                 "model layout")
            delta = delta.to(device=work.device, dtype=torch.float32).reshape(region.shape)
            region.add_(delta, alpha=entry.strength)
    return work.to(dtype or original.dtype)


@dataclass(frozen=True, eq=False)
class WeightDeltaPatch:
    """Adds strength * delta to parameters while applied (LoRA, LoHa, LoKr, diffs).

    Several entries may change one parameter (OpenCLIP's q/k/v rows of in_proj_weight); they
    are summed in float32 before the single rounding to the parameter dtype."""

    deltas: tuple[ParamDelta, ...]

    def apply(self, module: nn.Module) -> Undo:
        by_param: dict[str, list[ParamDelta]] = {}
        for entry in self.deltas:
            by_param.setdefault(entry.param, []).append(entry)
        swaps = []
        for name, entries in by_param.items():
            param = _parameter(module, name)
            swaps.append((param, patched_value(name, param.data, entries,
                                               kept_dtype(module, name, param))))
        return swap_in(swaps)


def _parameter(module: nn.Module, name: str) -> nn.Parameter:
    try:
        return module.get_parameter(name)
    except AttributeError as exc:
        raise ValueError(f"{type(module).__name__} has no parameter {name!r}; the patch was made "
                         "for another model") from exc


@dataclass(frozen=True)
class WeightSource:
    """Another network's weights as its own handle sees them: its module under its patches.

    `pristine` (the module's unpatched tensors, taken outside any patched block) is needed
    when the source shares the module being patched, whose tensors are then not the base."""

    module: nn.Module
    patches: tuple[Patch, ...]
    pristine: Mapping[str, Tensor] | None = None

    @classmethod
    def of(cls, module: nn.Module, patches: Sequence[Patch], target: nn.Module) -> WeightSource:
        """The source for merging into `target`; call outside any patched block."""
        pristine = None
        if module is target:
            pristine = MappingProxyType({name: param.data
                                         for name, param in module.named_parameters()})
        return cls(module, tuple(patches), pristine)


@contextmanager
def source_weights(source: WeightSource, target: nn.Module) -> Iterator[dict[str, Tensor]]:
    """The source's parameters (name -> tensor) under its patches, for the block's duration."""
    if source.module is not target:
        with patched(source.module, source.patches) as module:
            yield {name: param.data for name, param in module.named_parameters()}
        return
    if source.pristine is None:
        raise ValueError("this merge shares its network with the model it patches but was made "
                         "without the base weights; build its WeightSource with WeightSource.of")
    params = dict(target.named_parameters())
    restore = swap_in([(param, source.pristine[name]) for name, param in params.items()])
    try:
        with patched(target, source.patches):
            yield {name: param.data for name, param in params.items()}
    finally:
        restore()


@dataclass(frozen=True)
class MergeRule:
    """new = own * w + other * w_source per parameter: the (own, other) pair of the longest
    matching name prefix, `default` elsewhere; parameters ending in `skip` are left alone."""

    default: tuple[float, float]
    by_prefix: tuple[tuple[str, float, float], ...] = ()
    skip: tuple[str, ...] = ()

    def scales(self, name: str) -> tuple[float, float] | None:
        if self.skip and name.endswith(self.skip):
            return None
        best, scales = -1, self.default
        for prefix, own, other in self.by_prefix:
            if name.startswith(prefix) and len(prefix) > best:
                best, scales = len(prefix), (own, other)
        return None if scales == (1.0, 0.0) else scales


@dataclass(frozen=True, eq=False)
class MergePatch:
    """Blends the patched module's weights with another network's (ModelMerge*, CLIPMerge*)."""

    source: WeightSource
    rule: MergeRule

    def apply(self, module: nn.Module) -> Undo:
        """Swap in the merged weights. As in ComfyUI, a weight the other network lacks is left
        as it is, and one whose shape differs (an inpainting UNet's 9-channel input against a
        4-channel one) is only scaled by its own factor, with a warning naming it."""
        params = dict(module.named_parameters())
        ours = {name: param.data for name, param in params.items()}  # before the source's view
        swaps, mismatched = [], []
        with source_weights(self.source, module) as theirs:
            for name, param in params.items():
                scales = self.rule.scales(name)
                if scales is None or name not in theirs:
                    continue
                if theirs[name].shape != ours[name].shape:
                    mismatched.append(f"{name} {tuple(ours[name].shape)} != "
                                      f"{tuple(theirs[name].shape)}")
                    scales = (scales[0], 0.0)
                swaps.append((param, merged_value(ours[name], theirs[name], scales,
                                                  kept_dtype(module, name, param))))
        if mismatched:
            logger.warning("merge: shapes differ, these weights were not merged: %s",
                           "; ".join(mismatched))
        return swap_in(swaps)


def merged_value(ours: Tensor, theirs: Tensor, scales: tuple[float, float],
                 dtype: torch.dtype | None = None) -> Tensor:
    """own * ours + other * theirs in float32 (theirs ignored when other is 0), rounded once
    to `dtype` (default: our dtype)."""
    own, other = scales
    with torch.no_grad():
        mixed = ours.float() * own
        if other:
            mixed = mixed + theirs.to(ours.device, torch.float32) * other
    return mixed.to(dtype or ours.dtype)
