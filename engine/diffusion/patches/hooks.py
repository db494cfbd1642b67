"""Hooks (ComfyUI's nodes_hooks): weight patches that apply only while the conditioning entries
carrying them are sampled (or while the CLIP carrying them encodes), at a strength scheduled
over the run by keyframes.

* A `WeightHook` is a LoRA file or another model's weights ("model as LoRA": w + s * (w_other -
  w)), with its model and CLIP strengths and its keyframes. Clones share a `ref`; a HOOKS value
  (`HookGroup`) holds each ref once.
* Keyframes (HOOK_KEYFRAMES) are sorted by start_percent. A run starts on the first keyframe;
  at each new sigma, once the current keyframe has been used for its `guarantee_steps`, it moves
  on to every later keyframe whose start sigma is >= the current sigma, stopping at one that
  guarantees steps. The strength is the current keyframe's (1 with no keyframes).
* Entries with different hooks never share a UNet batch; a batch with hooks runs with their
  patches applied (strength_model * keyframe strength), undone after it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from engine.diffusion.memory.cast_on_use import kept_dtype
from engine.diffusion.patches.lora import LoraFile, lora_patches
from engine.diffusion.patches.patching import Patch, Undo, patched
from engine.diffusion.patches.weight_patches import (
    ParamDelta,
    WeightDeltaPatch,
    patched_value,
    swap_in,
)

INTERPOLATIONS = ("linear", "ease_in", "ease_out", "ease_in_out")
UNET_TARGET = "unet"


@dataclass(frozen=True)
class HookKeyframe:
    """From `start_percent` of the run on, the hook's strength is multiplied by `strength`."""

    strength: float
    start_percent: float = 0.0
    guarantee_steps: int = 1


@dataclass(frozen=True)
class HookKeyframes:
    """HOOK_KEYFRAMES: keyframes sorted by start_percent (equal ones keep their order)."""

    keyframes: tuple[HookKeyframe, ...] = ()

    def adding(self, *keyframes: HookKeyframe) -> HookKeyframes:
        ordered = sorted((*self.keyframes, *keyframes), key=lambda kf: kf.start_percent)
        return HookKeyframes(tuple(ordered))


def interpolated(start: float, end: float, count: int, method: str) -> list[float]:
    """`count` values from start to end: linear, or eased (t^2, 1 - (1 - t)^2, (1 - cos pi t)/2)."""
    if method not in INTERPOLATIONS:
        raise ValueError(f"interpolation {method!r} is not one of {', '.join(INTERPOLATIONS)}")
    if method == "linear":
        return torch.linspace(start, end, count).tolist()
    steps = torch.linspace(0, 1, count)  # float32, as ComfyUI computes them
    eased = {"ease_in": steps**2, "ease_out": 1 - (1 - steps) ** 2,
             "ease_in_out": (1 - torch.cos(steps * math.pi)) / 2}[method]
    return (eased * (end - start) + start).tolist()


@dataclass(frozen=True)
class WeightHook:
    """One hook's weights (a LoRA file, or another model's UNet and text encoders) at its
    strengths, with its keyframes. Equal when the same hook (ref) with the same settings."""

    ref: object
    strength_model: float
    strength_clip: float
    lora: LoraFile | None = field(default=None, compare=False)
    unet_weights: nn.Module | None = field(default=None, compare=False)
    text_weights: Mapping[str, nn.Module] | None = field(default=None, compare=False)
    keyframes: HookKeyframes = HookKeyframes()

    def __loom_digest__(self) -> None:
        """Not content-hashable (a hook is itself, not its numbers): caches use the node key."""
        return None

    def __loom_nbytes__(self) -> int:
        """The LoRA file and checkpoints are accounted by the model manager that loaded them."""
        return 0

    def unet_patch(self, unet: nn.Module) -> HookPatch | None:
        """The patch for `unet` at strength_model (before the keyframe strength)."""
        if self.strength_model == 0:
            return None
        if self.lora is not None:
            return lora_patches(self.lora, unet=unet, encoders={},  # type: ignore[arg-type]
                                strength_model=self.strength_model).unet
        if self.unet_weights is None:
            return None
        return towards(self.unet_weights, self.strength_model)

    def text_patches(self, encoders: Mapping[str, nn.Module]) -> dict[str, HookPatch]:
        """The patches for each text encoder at strength_clip (before the keyframe strength)."""
        if self.strength_clip == 0:
            return {}
        if self.lora is not None:
            found = lora_patches(self.lora, unet=None, encoders=encoders,
                                 strength_clip=self.strength_clip)
            return dict(found.text)
        weights = self.text_weights or {}
        return {name: towards(weights[name], self.strength_clip)
                for name in encoders if name in weights}


@dataclass(frozen=True, eq=False)
class TowardsPatch:
    """Model as LoRA: each parameter the source also has (same name and shape) moved by
    strength * (source's - its own); the source's weights are held loaded meanwhile."""

    source: nn.Module
    strength: float

    def apply(self, module: nn.Module) -> Undo:
        with patched(self.source, ()):
            theirs = dict(self.source.named_parameters())
            swaps = []
            for name, param in module.named_parameters():
                other = theirs.get(name)
                if other is None or other.shape != param.shape:
                    continue  # ComfyUI applies the keys both models have
                difference = other.detach().to(param.device, torch.float32) - param.data.float()
                swaps.append((param, patched_value(
                    name, param.data, [ParamDelta(name, difference, self.strength)],
                    kept_dtype(module, name, param))))
        return swap_in(swaps)


def towards(source: nn.Module, strength: float) -> TowardsPatch:
    return TowardsPatch(source, strength)


HookPatch = WeightDeltaPatch | TowardsPatch


def scaled(patch: HookPatch, strength: float) -> HookPatch:
    """The same patch at `strength` times its strength."""
    if isinstance(patch, TowardsPatch):
        return TowardsPatch(patch.source, patch.strength * strength)
    return WeightDeltaPatch(tuple(dataclasses.replace(delta, strength=delta.strength * strength)
                                  for delta in patch.deltas))


@dataclass(frozen=True)
class HookGroup:
    """HOOKS: weight hooks, each ref once, in the order first added."""

    hooks: tuple[WeightHook, ...] = ()

    def combined(self, other: HookGroup | None) -> HookGroup:
        if other is None:
            return self
        refs = {hook.ref for hook in self.hooks}
        return HookGroup(self.hooks + tuple(h for h in other.hooks if h.ref not in refs))

    def with_keyframes(self, keyframes: HookKeyframes | None) -> HookGroup:
        """Every hook with these keyframes (none: constant strength 1)."""
        chosen = keyframes or HookKeyframes()
        return HookGroup(tuple(dataclasses.replace(hook, keyframes=chosen)
                               for hook in self.hooks))

    @staticmethod
    def combine_all(groups: Iterable[HookGroup | None]) -> HookGroup | None:
        present = [group for group in groups if group is not None]
        if not present:
            return None
        combined = present[0]
        for group in present[1:]:
            combined = combined.combined(group)
        return combined


def new_hook(strength_model: float, strength_clip: float, *, lora: LoraFile | None = None,
             unet_weights: nn.Module | None = None,
             text_weights: Mapping[str, nn.Module] | None = None) -> HookGroup:
    """A HOOKS value with one new hook."""
    return HookGroup((WeightHook(object(), strength_model, strength_clip, lora, unet_weights,
                                 text_weights),))


@dataclass(eq=False)
class KeyframeCursor:
    """Where one hook's keyframes are in a sampling run (module docstring's rules)."""

    keyframes: tuple[HookKeyframe, ...]
    start_sigmas: tuple[float, ...]
    index: int = 0
    used_steps: int = 0
    last_sigma: float | None = None

    def strength_at(self, sigma: float) -> float:
        if not self.keyframes:
            return 1.0
        if sigma != self.last_sigma:
            self._advance(sigma)
            self.used_steps += 1
            self.last_sigma = sigma
        return self.keyframes[self.index].strength

    def _advance(self, sigma: float) -> None:
        if self.used_steps < self.keyframes[self.index].guarantee_steps:
            return
        for index in range(self.index + 1, len(self.keyframes)):
            if self.start_sigmas[index] < sigma:
                break  # not reached yet
            self.index, self.used_steps = index, 0
            if self.keyframes[index].guarantee_steps > 0:
                break


@dataclass(eq=False)
class HookSchedule:
    """Per sampling run: each hook's keyframe cursor and its patch for the sampled UNet."""

    percent_to_sigma: Any  # Callable[[float], float], the model's schedule
    cursors: dict[tuple[object, HookKeyframes], KeyframeCursor] = field(default_factory=dict)
    unet_patches: dict[object, HookPatch | None] = field(default_factory=dict)

    def strength(self, hook: WeightHook, sigma: float) -> float:
        key = (hook.ref, hook.keyframes)
        cursor = self.cursors.get(key)
        if cursor is None:
            frames = hook.keyframes.keyframes
            cursor = KeyframeCursor(frames, tuple(self.percent_to_sigma(kf.start_percent)
                                                  for kf in frames))
            self.cursors[key] = cursor
        return cursor.strength_at(sigma)

    def patches_for(self, hooks: HookGroup, unet: nn.Module, sigma: float) -> list[Patch]:
        """The UNet patches of `hooks` at their strengths for this sigma."""
        found: list[Patch] = []
        for hook in hooks.hooks:
            if hook.ref not in self.unet_patches:
                self.unet_patches[hook.ref] = hook.unet_patch(unet)
            patch = self.unet_patches[hook.ref]
            strength = self.strength(hook, sigma)
            if patch is not None and strength != 0:
                found.append(scaled(patch, strength))
        return found


def clip_schedule(hooks: HookGroup) -> list[tuple[tuple[float, float], dict[object, float]]]:
    """The ranges of the run over which every hook's keyframe strength is constant, each with
    those strengths by ref (SetClipHooks' schedule_clip: one encoding per range)."""
    per_hook: dict[object, list[tuple[tuple[float, float], float]]] = {}
    for hook in hooks.hooks:
        per_hook[hook.ref] = _constant_ranges(hook.keyframes.keyframes)
    bounds = sorted({0.0} | {edge for ranges in per_hook.values()
                             for span, _ in ranges for edge in span})
    schedule = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        strengths = {}
        for ref, ranges in per_hook.items():
            strengths[ref] = next((strength for (low, high), strength in ranges
                                   if low < end and high > start), 1.0)
        schedule.append(((start, end), strengths))
    return schedule


def _constant_ranges(keyframes: tuple[HookKeyframe, ...]
                     ) -> list[tuple[tuple[float, float], float]]:
    """(start, end) percent ranges each with one strength; the whole run at 1 without keyframes."""
    if not keyframes:
        return [((0.0, 1.0), 1.0)]
    ranges = []
    previous = keyframes[0]
    for keyframe in keyframes:
        if (keyframe.start_percent > previous.start_percent
                and not math.isclose(keyframe.strength, previous.strength)):
            ranges.append(((previous.start_percent, keyframe.start_percent), previous.strength))
            previous = keyframe
        elif keyframe.start_percent == previous.start_percent:
            previous = keyframe
    if not math.isclose(previous.start_percent, 1.0):
        ranges.append(((previous.start_percent, 1.0), previous.strength))
    return ranges
