"""LoRA-family files as weight patches for a model's UNet and text encoders.

A file is parsed once (`parse_lora`: tensors grouped into adapters, left memory-mapped) and
shared; `lora_patches` maps it onto one model's networks through the name table
(patches/lora_keys.py) and gives one WeightDeltaPatch per network. Deltas are computed
when a patch is applied, on the weight's device, so an unused LoRA costs no compute memory.

Keys that fit nothing (unknown module, wrong shape, incomplete adapter, unknown tensor kind)
are never dropped silently: they are counted in a LoraReport, logged as a warning on the
"loom.lora" logger, and returned for the node to show."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Protocol, TypeVar

from torch import Tensor, nn

from engine.diffusion.networks.unet import UNet
from engine.diffusion.patches.lora_formats import Adapter, LoraFormatError, make_adapter, split_key
from engine.diffusion.patches.lora_keys import UNET, Target, lora_name_table
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.patches.patching import Patch
from engine.diffusion.patches.weight_patches import ParamDelta, WeightDeltaPatch

logger = logging.getLogger("loom.lora")
EXAMPLE_COUNT = 5
# module-name prefixes of text-encoder adapters (left out, not unmatched, without a CLIP)
TEXT_PREFIXES = ("lora_te", "text_encoder")


@dataclass(frozen=True)
class LoraFile:
    """A parsed LoRA file: adapters by module name, and keys that form no adapter (-> why)."""

    name: str
    adapters: Mapping[str, Adapter]
    invalid: Mapping[str, str]

    @property
    def key_count(self) -> int:
        return sum(len(adapter.keys) for adapter in self.adapters.values()) + len(self.invalid)


def parse_lora(state: Mapping[str, Tensor], name: str = "") -> LoraFile:
    """Group a LoRA state dict's tensors by adapted module and recognise each one's format."""
    groups: dict[str, dict[str, Tensor]] = {}
    keys: dict[str, list[str]] = {}
    invalid: dict[str, str] = {}
    for key in state:
        split = split_key(key)
        if split is None:
            invalid[key] = "not a tensor of any known LoRA format"
            continue
        module, role = split
        if role in groups.setdefault(module, {}):
            invalid[key] = f"a second {role!r} tensor for module {module!r}"
            continue
        groups[module][role] = state[key]
        keys.setdefault(module, []).append(key)
    adapters = {}
    for module, tensors in groups.items():
        try:
            adapters[module] = make_adapter(tensors, tuple(keys[module]))
        except LoraFormatError as exc:  # reported with the file's other unusable keys
            invalid.update({key: f"{module}: {exc}" for key in keys[module]})
    return LoraFile(name, MappingProxyType(adapters), MappingProxyType(invalid))


@dataclass(frozen=True)
class LoraReport:
    """How much of a file a model took: keys applied, keys matching nothing (with examples),
    and text-encoder keys left out because no CLIP was given (LoraLoaderModelOnly)."""

    name: str
    matched: int
    unmatched: int
    examples: tuple[str, ...] = ()
    skipped_text: int = 0

    def summary(self) -> str:
        text = f"LoRA {self.name}: {self.matched} keys applied"
        if self.skipped_text:
            text += f", {self.skipped_text} text-encoder keys left out (no CLIP given)"
        if self.unmatched:
            text += (f", {self.unmatched} keys matched nothing in this model and were not "
                     f"applied, e.g. {'; '.join(self.examples)}")
        return text


@dataclass(frozen=True)
class LoraPatches:
    """One file's patches for one model: the UNet's, each text encoder's, and the report."""

    unet: WeightDeltaPatch | None
    text: Mapping[str, WeightDeltaPatch]
    report: LoraReport


@dataclass
class _Collector:
    """Accumulates deltas per network and the report's counts while a file is mapped."""

    deltas: dict[str, list[ParamDelta]] = field(default_factory=dict)
    matched: int = 0
    skipped_text: int = 0
    unmatched: dict[str, str] = field(default_factory=dict)

    def reject(self, adapter: Adapter, reason: str) -> None:
        self.unmatched.update({key: reason for key in adapter.keys})


def _region_shape(module: nn.Module, name: str, rows: tuple[int, int] | None
                  ) -> tuple[int, ...]:
    shape = tuple(module.get_parameter(name).shape)
    return shape if rows is None else (rows[1] - rows[0], *shape[1:])


def _misfit(adapter: Adapter, target: Target, module: nn.Module) -> str | None:
    """Why `adapter` cannot change `target`, or None when its shapes fit."""
    wanted = adapter.weight_shape()
    if wanted is not None:
        have = _region_shape(module, target.weight, target.rows)
        if math.prod(wanted) != math.prod(have):
            return f"delta shape {list(wanted)} does not fit weight {list(have)}"
    bias = adapter.tensors.get("diff_b")
    if bias is not None:
        if target.bias is None:
            return "a bias difference for a module without bias"
        have = _region_shape(module, target.bias, target.rows)
        if bias.numel() != math.prod(have):
            return f"bias delta shape {list(bias.shape)} does not fit bias {list(have)}"
    return None


def _param_deltas(adapter: Adapter, target: Target, strength: float) -> list[ParamDelta]:
    deltas = []
    if adapter.weight_shape() is not None:
        delta = partial(_transposed_delta, adapter) if target.transposed else adapter.weight_delta
        deltas.append(ParamDelta(target.weight, delta, strength, target.rows))
    if "diff_b" in adapter.tensors and target.bias is not None:
        deltas.append(ParamDelta(target.bias, partial(_bias_delta, adapter), strength,
                                 target.rows))
    return deltas


def _transposed_delta(adapter: Adapter, weight: Tensor) -> Tensor:
    """The delta of a weight stored transposed to the file's layout."""
    return adapter.weight_delta(weight.t()).t()


def _bias_delta(adapter: Adapter, bias: Tensor) -> Tensor:
    delta = adapter.bias_delta(bias.device)
    assert delta is not None  # only bias-carrying adapters get a bias entry
    return delta


def lora_patches(lora: LoraFile, *, unet: UNet | None, encoders: Mapping[str, nn.Module],
                 strength_model: float = 1.0, strength_clip: float = 1.0) -> LoraPatches:
    """Map a parsed file onto a UNet and/or text encoders (by name: "l", "h", "g").

    A side with strength 0 gets no patch, but its keys still count as matched."""
    table = lora_name_table(unet, encoders)
    networks: dict[str, nn.Module] = dict(encoders)
    if unet is not None:
        networks[UNET] = unet
    strengths = {name: strength_clip for name in encoders} | {UNET: strength_model}
    found = _Collector(unmatched=dict(lora.invalid))
    for module_name, adapter in lora.adapters.items():
        target = table.get(module_name)
        if target is None:
            if not encoders and module_name.startswith(TEXT_PREFIXES):
                found.skipped_text += len(adapter.keys)
            elif unet is None and not module_name.startswith(TEXT_PREFIXES):
                continue  # the UNet's part, when only text encoders are patched (CLIP hooks)
            else:
                found.reject(adapter, f"no module {module_name!r} in this model")
            continue
        problem = _misfit(adapter, target, networks[target.component])
        if problem is not None:
            found.reject(adapter, f"{module_name}: {problem}")
            continue
        found.matched += len(adapter.keys)
        strength = strengths[target.component]
        if strength != 0.0:
            found.deltas.setdefault(target.component, []).extend(
                _param_deltas(adapter, target, strength))
    return _finish(lora.name, found)


def _finish(name: str, found: _Collector) -> LoraPatches:
    examples = tuple(f"{key} ({reason})" for key, reason in
                     list(found.unmatched.items())[:EXAMPLE_COUNT])
    report = LoraReport(name, found.matched, len(found.unmatched), examples, found.skipped_text)
    if report.unmatched:
        logger.warning("%s", report.summary())
    patches = {component: WeightDeltaPatch(tuple(deltas))
               for component, deltas in found.deltas.items() if deltas}
    unet = patches.pop(UNET, None)
    return LoraPatches(unet, MappingProxyType(patches), report)


TextT = TypeVar("TextT", bound="PatchableText")


class PatchableText(Protocol):
    """The CLIP value as LoRA sees it (text.encoding.TextEncoderStack, a higher layer): its
    encoders by name and a clone carrying one more patch per encoder."""

    @property
    def encoders(self) -> Mapping[str, nn.Module]: ...

    def clone_with_patches(self: TextT, patches: Mapping[str, Patch]) -> TextT: ...


def apply_lora(model: ModelHandle | None, clip: TextT | None, lora: LoraFile,
               strength_model: float, strength_clip: float
               ) -> tuple[ModelHandle | None, TextT | None, LoraReport]:
    """Clones of `model` and `clip` carrying the file's patches (inputs are not changed)."""
    encoders = clip.encoders if clip is not None else {}
    patches = lora_patches(lora, unet=None if model is None else model.unet, encoders=encoders,
                           strength_model=strength_model, strength_clip=strength_clip)
    if model is not None and patches.unet is not None:
        model = model.replace(patches=model.patches + (patches.unet,))
    if clip is not None and patches.text:
        clip = clip.clone_with_patches(patches.text)
    return model, clip, patches.report
