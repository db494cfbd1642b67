"""Hook nodes (ComfyUI's comfy_extras/nodes_hooks): make weight hooks from a LoRA or another
checkpoint, schedule them with keyframes, combine them, and attach them to conditioning entries
(or to a CLIP) so they apply only while those are sampled (engine/diffusion/patches/hooks.py).
HOOKS is a HookGroup, HOOK_KEYFRAMES a HookKeyframes, TIMESTEPS_RANGE a (start, end) pair."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from engine.context import NodeContext
from engine.diffusion.patches.hooks import (
    INTERPOLATIONS,
    HookGroup,
    HookKeyframe,
    HookKeyframes,
    interpolated,
    new_hook,
)
from engine.diffusion.text.encoding import TextEncoderStack
from engine.node import Boolean, Combo, FilesIn, Float, Input, Int, Link, Node, NodeSchema, Output
from nodes.conditioning import SET_COND_AREA, Conditioning, with_values
from nodes.loaders import file_fingerprint, load_checkpoint_file
from nodes.lora import lora_file

logger = logging.getLogger("loom.hooks")
HOOK_STRENGTH = {"min": -20.0, "max": 20.0, "step": 0.01}
PERCENT = {"min": 0.0, "max": 1.0, "step": 0.001}


def _optional(name: str, type_name: str) -> Input:
    return Link(name, type_name, optional=True)


def _hooks_out() -> tuple[Output, ...]:
    return (Output("HOOKS"),)


def _keyframes_out() -> tuple[Output, ...]:
    return (Output("HOOK_KEYFRAMES", "HOOK_KF"),)


# --- creating hooks -----------------------------------------------------------------------


class _CreateHook(Node):
    """A HOOKS value: the previous hooks plus one made from a file of `folder`."""

    folder = "loras"

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        name = inputs["lora_name" if self.folder == "loras" else "ckpt_name"]
        return file_fingerprint(ctx, self.folder, name)

    def create(self, ctx: NodeContext, name: str, strength_model: float, strength_clip: float,
               prev_hooks: HookGroup | None) -> tuple[HookGroup]:
        previous = prev_hooks or HookGroup()
        if strength_model == 0 and strength_clip == 0:
            return (previous,)
        if self.folder == "loras":
            hook = new_hook(strength_model, strength_clip, lora=lora_file(ctx, name))
        else:
            model, clip, _ = load_checkpoint_file(ctx, name)
            text = None if clip is None else dict(clip.encoders)
            hook = new_hook(strength_model, strength_clip, unet_weights=model.unet,
                            text_weights=text)
        return (previous.combined(hook),)


def _create_schema(name: str, display_name: str, file_input: Input, with_clip: bool
                   ) -> NodeSchema:
    strengths = [Float("strength_model", 1.0, **HOOK_STRENGTH)]
    if with_clip:
        strengths.append(Float("strength_clip", 1.0, **HOOK_STRENGTH))
    return NodeSchema(name, (file_input, *strengths, _optional("prev_hooks", "HOOKS")),
                      _hooks_out(), category="advanced/hooks/create", display_name=display_name,
                      experimental=True)


class CreateHookLora(_CreateHook):
    schema = _create_schema("CreateHookLora", "Create Hook LoRA",
                            Combo("lora_name", FilesIn("loras")), with_clip=True)

    def execute(self, ctx: NodeContext, lora_name: str, strength_model: float,
                strength_clip: float, prev_hooks: HookGroup | None = None) -> tuple[HookGroup]:
        return self.create(ctx, lora_name, strength_model, strength_clip, prev_hooks)


class CreateHookLoraModelOnly(_CreateHook):
    schema = _create_schema("CreateHookLoraModelOnly", "Create Hook LoRA (MO)",
                            Combo("lora_name", FilesIn("loras")), with_clip=False)

    def execute(self, ctx: NodeContext, lora_name: str, strength_model: float,
                prev_hooks: HookGroup | None = None) -> tuple[HookGroup]:
        return self.create(ctx, lora_name, strength_model, 0.0, prev_hooks)


class CreateHookModelAsLora(_CreateHook):
    schema = _create_schema("CreateHookModelAsLora", "Create Hook Model as LoRA",
                            Combo("ckpt_name", FilesIn("checkpoints")), with_clip=True)
    folder = "checkpoints"

    def execute(self, ctx: NodeContext, ckpt_name: str, strength_model: float,
                strength_clip: float, prev_hooks: HookGroup | None = None) -> tuple[HookGroup]:
        return self.create(ctx, ckpt_name, strength_model, strength_clip, prev_hooks)


class CreateHookModelAsLoraModelOnly(_CreateHook):
    schema = _create_schema("CreateHookModelAsLoraModelOnly", "Create Hook Model as LoRA (MO)",
                            Combo("ckpt_name", FilesIn("checkpoints")), with_clip=False)
    folder = "checkpoints"

    def execute(self, ctx: NodeContext, ckpt_name: str, strength_model: float,
                prev_hooks: HookGroup | None = None) -> tuple[HookGroup]:
        return self.create(ctx, ckpt_name, strength_model, 0.0, prev_hooks)


# --- scheduling ---------------------------------------------------------------------------


class SetHookKeyframes(Node):
    schema = NodeSchema(
        "SetHookKeyframes", (Link("hooks", "HOOKS"), _optional("hook_kf", "HOOK_KEYFRAMES")),
        _hooks_out(), category="advanced/hooks/scheduling", display_name="Set Hook Keyframes",
        experimental=True)

    def execute(self, ctx: NodeContext, hooks: HookGroup,
                hook_kf: HookKeyframes | None = None) -> tuple[HookGroup]:
        return (hooks if hook_kf is None else hooks.with_keyframes(hook_kf),)


class CreateHookKeyframe(Node):
    schema = NodeSchema(
        "CreateHookKeyframe",
        (Float("strength_mult", 1.0, **HOOK_STRENGTH), Float("start_percent", 0.0, **PERCENT),
         _optional("prev_hook_kf", "HOOK_KEYFRAMES")),
        _keyframes_out(), category="advanced/hooks/scheduling",
        display_name="Create Hook Keyframe", experimental=True)

    def execute(self, ctx: NodeContext, strength_mult: float, start_percent: float,
                prev_hook_kf: HookKeyframes | None = None) -> tuple[HookKeyframes]:
        keyframe = HookKeyframe(strength_mult, start_percent)
        return ((prev_hook_kf or HookKeyframes()).adding(keyframe),)


def _keyframes(previous: HookKeyframes | None, percents: Sequence[float],
               strengths: Sequence[float], show: bool) -> HookKeyframes:
    """Keyframes at `percents` with `strengths`; only the first guarantees a step."""
    frames = [HookKeyframe(float(strength), float(percent), 1 if index == 0 else 0)
              for index, (percent, strength) in enumerate(zip(percents, strengths, strict=False))]
    if show:
        for frame in frames:
            logger.info("Hook Keyframe - start_percent:%s = %s", frame.start_percent,
                        frame.strength)
    return (previous or HookKeyframes()).adding(*frames)


class CreateHookKeyframesInterpolated(Node):
    schema = NodeSchema(
        "CreateHookKeyframesInterpolated",
        (Float("strength_start", 1.0, min=0.0, max=10.0, step=0.001),
         Float("strength_end", 1.0, min=0.0, max=10.0, step=0.001),
         Combo("interpolation", INTERPOLATIONS), Float("start_percent", 0.0, **PERCENT),
         Float("end_percent", 1.0, **PERCENT), Int("keyframes_count", 5, min=2, max=100, step=1),
         Boolean("print_keyframes", False), _optional("prev_hook_kf", "HOOK_KEYFRAMES")),
        _keyframes_out(), category="advanced/hooks/scheduling",
        display_name="Create Hook Keyframes Interp.", experimental=True)

    def execute(self, ctx: NodeContext, strength_start: float, strength_end: float,
                interpolation: str, start_percent: float, end_percent: float,
                keyframes_count: int, print_keyframes: bool,
                prev_hook_kf: HookKeyframes | None = None) -> tuple[HookKeyframes]:
        percents = interpolated(start_percent, end_percent, keyframes_count, "linear")
        strengths = interpolated(strength_start, strength_end, keyframes_count, interpolation)
        return (_keyframes(prev_hook_kf, percents, strengths, print_keyframes),)


class CreateHookKeyframesFromFloats(Node):
    schema = NodeSchema(
        "CreateHookKeyframesFromFloats",
        (Input("floats_strength", "FLOATS", default=-1, min=-1, step=0.001,
               options={"forceInput": True}),
         Float("start_percent", 0.0, **PERCENT), Float("end_percent", 1.0, **PERCENT),
         Boolean("print_keyframes", False), _optional("prev_hook_kf", "HOOK_KEYFRAMES")),
        _keyframes_out(), category="advanced/hooks/scheduling",
        display_name="Create Hook Keyframes From Floats", experimental=True)

    def execute(self, ctx: NodeContext, floats_strength: Any, start_percent: float,
                end_percent: float, print_keyframes: bool,
                prev_hook_kf: HookKeyframes | None = None) -> tuple[HookKeyframes]:
        strengths = _floats(floats_strength)
        percents = interpolated(start_percent, end_percent, len(strengths), "linear")
        return (_keyframes(prev_hook_kf, percents, strengths, print_keyframes),)


def _floats(value: Any) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, Tensor):
        return [float(item) for item in value.flatten()]
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [float(item) for item in value]
    raise TypeError(f"CreateHookKeyframesFromFloats: floats_strength must be a float or a list "
                    f"of floats, got {type(value).__name__}; connect a FLOATS output")


# --- combining ----------------------------------------------------------------------------


def _combine_schema(count: int) -> NodeSchema:
    letters = "ABCDEFGH"[:count]
    return NodeSchema(
        f"CombineHooks{count}", tuple(_optional(f"hooks_{letter}", "HOOKS") for letter in letters),
        _hooks_out(), category="advanced/hooks/combine", display_name=f"Combine Hooks [{count}]",
        experimental=True)


class _CombineHooks(Node):
    def execute(self, ctx: NodeContext, **hooks: HookGroup | None) -> tuple[HookGroup | None]:
        return (HookGroup.combine_all(hooks[name] for name in sorted(hooks)),)


class CombineHooks2(_CombineHooks):
    schema = _combine_schema(2)


class CombineHooks4(_CombineHooks):
    schema = _combine_schema(4)


class CombineHooks8(_CombineHooks):
    schema = _combine_schema(8)


# --- attaching to conditioning ------------------------------------------------------------


def with_hooks(conditioning: Conditioning, hooks: HookGroup | None) -> Conditioning:
    """Every entry carrying `hooks` too (after hooks it already has)."""
    if hooks is None:
        return conditioning
    return [[cond, {**options, "hooks": hooks if options.get("hooks") is None
                    else options["hooks"].combined(hooks)}] for cond, options in conditioning]


def with_properties(conditioning: Conditioning, strength: float, set_cond_area: str,
                    mask: Tensor | None, hooks: HookGroup | None,
                    timesteps: tuple[float, float] | None) -> Conditioning:
    """ComfyUI's set_conds_props on one CONDITIONING: hooks, then mask (with its strength and
    area rule), then timestep range."""
    conditioning = with_hooks(conditioning, hooks)
    if mask is not None:
        mask = mask.unsqueeze(0) if mask.ndim < 3 else mask
        conditioning = with_values(conditioning, {
            "mask": mask, "set_area_to_bounds": set_cond_area != "default",
            "mask_strength": strength})
    if timesteps is not None:
        conditioning = with_values(conditioning, {"start_percent": timesteps[0],
                                                  "end_percent": timesteps[1]})
    return conditioning


def _property_inputs() -> tuple[Input, ...]:
    return (Float("strength", 1.0, min=0.0, max=10.0, step=0.01),
            Combo("set_cond_area", SET_COND_AREA), _optional("mask", "MASK"),
            _optional("hooks", "HOOKS"), _optional("timesteps", "TIMESTEPS_RANGE"))


def _pair_out() -> tuple[Output, ...]:
    return (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"))


class ConditioningSetProperties(Node):
    schema = NodeSchema(
        "ConditioningSetProperties", (Link("cond_NEW", "CONDITIONING"), *_property_inputs()),
        (Output("CONDITIONING"),), category="advanced/hooks/cond single",
        display_name="Cond Set Props", experimental=True)

    def execute(self, ctx: NodeContext, cond_NEW: Conditioning, strength: float,  # noqa: N803
                set_cond_area: str, mask: Tensor | None = None, hooks: HookGroup | None = None,
                timesteps: tuple[float, float] | None = None) -> tuple[Conditioning]:
        return (with_properties(cond_NEW, strength, set_cond_area, mask, hooks, timesteps),)


class ConditioningSetPropertiesAndCombine(Node):
    schema = NodeSchema(
        "ConditioningSetPropertiesAndCombine",
        (Link("cond", "CONDITIONING"), Link("cond_NEW", "CONDITIONING"), *_property_inputs()),
        (Output("CONDITIONING"),), category="advanced/hooks/cond single",
        display_name="Cond Set Props Combine", experimental=True)

    def execute(self, ctx: NodeContext, cond: Conditioning, cond_NEW: Conditioning,  # noqa: N803
                strength: float, set_cond_area: str, mask: Tensor | None = None,
                hooks: HookGroup | None = None,
                timesteps: tuple[float, float] | None = None) -> tuple[Conditioning]:
        new = with_properties(cond_NEW, strength, set_cond_area, mask, hooks, timesteps)
        return (list(cond) + new,)


class PairConditioningSetProperties(Node):
    schema = NodeSchema(
        "PairConditioningSetProperties",
        (Link("positive_NEW", "CONDITIONING"), Link("negative_NEW", "CONDITIONING"),
         *_property_inputs()),
        _pair_out(), category="advanced/hooks/cond pair", display_name="Cond Pair Set Props",
        experimental=True)

    def execute(self, ctx: NodeContext, positive_NEW: Conditioning,  # noqa: N803
                negative_NEW: Conditioning, strength: float, set_cond_area: str,  # noqa: N803
                mask: Tensor | None = None, hooks: HookGroup | None = None,
                timesteps: tuple[float, float] | None = None
                ) -> tuple[Conditioning, Conditioning]:
        return (with_properties(positive_NEW, strength, set_cond_area, mask, hooks, timesteps),
                with_properties(negative_NEW, strength, set_cond_area, mask, hooks, timesteps))


class PairConditioningSetPropertiesAndCombine(Node):
    schema = NodeSchema(
        "PairConditioningSetPropertiesAndCombine",
        (Link("positive", "CONDITIONING"), Link("negative", "CONDITIONING"),
         Link("positive_NEW", "CONDITIONING"), Link("negative_NEW", "CONDITIONING"),
         *_property_inputs()),
        _pair_out(), category="advanced/hooks/cond pair",
        display_name="Cond Pair Set Props Combine", experimental=True)

    def execute(self, ctx: NodeContext, positive: Conditioning, negative: Conditioning,
                positive_NEW: Conditioning, negative_NEW: Conditioning,  # noqa: N803
                strength: float, set_cond_area: str, mask: Tensor | None = None,
                hooks: HookGroup | None = None, timesteps: tuple[float, float] | None = None
                ) -> tuple[Conditioning, Conditioning]:
        new_positive = with_properties(positive_NEW, strength, set_cond_area, mask, hooks,
                                       timesteps)
        new_negative = with_properties(negative_NEW, strength, set_cond_area, mask, hooks,
                                       timesteps)
        return (list(positive) + new_positive, list(negative) + new_negative)


class PairConditioningCombine(Node):
    schema = NodeSchema(
        "PairConditioningCombine",
        (Link("positive_A", "CONDITIONING"), Link("negative_A", "CONDITIONING"),
         Link("positive_B", "CONDITIONING"), Link("negative_B", "CONDITIONING")),
        _pair_out(), category="advanced/hooks/cond pair", display_name="Cond Pair Combine",
        experimental=True)

    def execute(self, ctx: NodeContext, positive_A: Conditioning,  # noqa: N803
                negative_A: Conditioning, positive_B: Conditioning,  # noqa: N803
                negative_B: Conditioning) -> tuple[Conditioning, Conditioning]:  # noqa: N803
        return (list(positive_A) + list(positive_B), list(negative_A) + list(negative_B))


def as_default(conditioning: Conditioning, hooks: HookGroup | None) -> Conditioning:
    """Entries marked `default`: used only where the side's other entries leave weight."""
    return with_values(with_hooks(conditioning, hooks), {"default": True})


class ConditioningSetDefaultCombine(Node):
    schema = NodeSchema(
        "ConditioningSetDefaultCombine",
        (Link("cond", "CONDITIONING"), Link("cond_DEFAULT", "CONDITIONING"),
         _optional("hooks", "HOOKS")),
        (Output("CONDITIONING"),), category="advanced/hooks/cond single",
        display_name="Cond Set Default Combine", experimental=True)

    def execute(self, ctx: NodeContext, cond: Conditioning, cond_DEFAULT: Conditioning,  # noqa: N803
                hooks: HookGroup | None = None) -> tuple[Conditioning]:
        return (list(cond) + as_default(cond_DEFAULT, hooks),)


class PairConditioningSetDefaultCombine(Node):
    schema = NodeSchema(
        "PairConditioningSetDefaultCombine",
        (Link("positive", "CONDITIONING"), Link("negative", "CONDITIONING"),
         Link("positive_DEFAULT", "CONDITIONING"), Link("negative_DEFAULT", "CONDITIONING"),
         _optional("hooks", "HOOKS")),
        _pair_out(), category="advanced/hooks/cond pair",
        display_name="Cond Pair Set Default Combine", experimental=True)

    def execute(self, ctx: NodeContext, positive: Conditioning, negative: Conditioning,
                positive_DEFAULT: Conditioning, negative_DEFAULT: Conditioning,  # noqa: N803
                hooks: HookGroup | None = None) -> tuple[Conditioning, Conditioning]:
        return (list(positive) + as_default(positive_DEFAULT, hooks),
                list(negative) + as_default(negative_DEFAULT, hooks))


class SetClipHooks(Node):
    schema = NodeSchema(
        "SetClipHooks",
        (Link("clip", "CLIP"), Boolean("apply_to_conds", True), Boolean("schedule_clip", False),
         _optional("hooks", "HOOKS")),
        (Output("CLIP"),), category="advanced/hooks/clip", display_name="Set CLIP Hooks",
        experimental=True)

    def execute(self, ctx: NodeContext, clip: TextEncoderStack, apply_to_conds: bool,
                schedule_clip: bool, hooks: HookGroup | None = None) -> tuple[TextEncoderStack]:
        if hooks is None:
            return (clip,)
        if not isinstance(clip, TextEncoderStack):
            raise TypeError(f"SetClipHooks: the clip input must be a CLIP (from a checkpoint or "
                            f"CLIP loader), got {type(clip).__name__}")
        return (clip.clone_with_hooks(hooks, apply_to_conds, schedule_clip),)


class ConditioningTimestepsRange(Node):
    schema = NodeSchema(
        "ConditioningTimestepsRange",
        (Float("start_percent", 0.0, **PERCENT), Float("end_percent", 1.0, **PERCENT)),
        (Output("TIMESTEPS_RANGE"), Output("TIMESTEPS_RANGE", "BEFORE_RANGE"),
         Output("TIMESTEPS_RANGE", "AFTER_RANGE")),
        category="advanced/hooks", display_name="Timesteps Range", experimental=True)

    def execute(self, ctx: NodeContext, start_percent: float, end_percent: float
                ) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
        return ((start_percent, end_percent), (0.0, start_percent), (end_percent, 1.0))


NODE_TYPES = (CreateHookLora, CreateHookLoraModelOnly, CreateHookModelAsLora,
              CreateHookModelAsLoraModelOnly, SetHookKeyframes, CreateHookKeyframe,
              CreateHookKeyframesInterpolated, CreateHookKeyframesFromFloats, CombineHooks2,
              CombineHooks4, CombineHooks8, ConditioningSetProperties,
              ConditioningSetPropertiesAndCombine, PairConditioningSetProperties,
              PairConditioningSetPropertiesAndCombine, ConditioningSetDefaultCombine,
              PairConditioningSetDefaultCombine, PairConditioningCombine, SetClipHooks,
              ConditioningTimestepsRange)
