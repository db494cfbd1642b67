"""Text conditioning nodes: CLIP text encoding (SD1/SD2, SDXL base and refiner) and clip skip.

CONDITIONING is ComfyUI's shape, a list of [cond tensor, options dict] pairs, so custom nodes
that read or build it keep working."""

from __future__ import annotations

import logging
from typing import Any

from engine.context import NodeContext
from engine.diffusion.text.encoding import PromptTokens, TextEncoderStack
from engine.node import Float, Int, Link, Node, NodeSchema, Output, String
from nodes.imaging import MAX_RESOLUTION

logger = logging.getLogger("loom.clip")
Conditioning = list[list[Any]]
SIZE = {"min": 0, "max": MAX_RESOLUTION}


def _prompt(name: str) -> Any:
    return String(name, multiline=True, options={"dynamicPrompts": True})


def _require_clip(clip: Any, node: str) -> TextEncoderStack:
    if clip is None:
        raise ValueError(f"{node}: the clip input is empty; the checkpoint has no text encoder "
                         "- connect a CLIPLoader or a checkpoint that contains one")
    return clip


def conditioning_for(clip: TextEncoderStack, tokens: PromptTokens,
                     options: dict[str, Any] | None = None) -> Conditioning:
    """CONDITIONING for tokens: one entry, or one per keyframe range of the CLIP's scheduled
    hooks (SetClipHooks), each with `options` and what the hooks add."""
    return [[encoded.cond, {"pooled_output": encoded.pooled, **(options or {}), **added}]
            for encoded, added in clip.encode_scheduled(tokens)]


class CLIPTextEncode(Node):
    schema = NodeSchema(
        "CLIPTextEncode", (_prompt("text"), Link("clip", "CLIP")), (Output("CONDITIONING"),),
        category="conditioning", display_name="CLIP Text Encode (Prompt)",
        description="Encodes a prompt ((word:1.2) weights, embedding:name) with a CLIP model.")

    def execute(self, ctx: NodeContext, text: str, clip: TextEncoderStack
                ) -> tuple[Conditioning]:
        clip = _require_clip(clip, "CLIPTextEncode")
        return (conditioning_for(clip, clip.tokenize(text)),)


class CLIPTextEncodeSDXL(Node):
    schema = NodeSchema(
        "CLIPTextEncodeSDXL",
        (Link("clip", "CLIP"), Int("width", 1024, **SIZE), Int("height", 1024, **SIZE),
         Int("crop_w", 0, **SIZE), Int("crop_h", 0, **SIZE), Int("target_width", 1024, **SIZE),
         Int("target_height", 1024, **SIZE), _prompt("text_g"), _prompt("text_l")),
        (Output("CONDITIONING"),), category="advanced/conditioning")

    def execute(self, ctx: NodeContext, clip: TextEncoderStack, width: int, height: int,
                crop_w: int, crop_h: int, target_width: int, target_height: int, text_g: str,
                text_l: str) -> tuple[Conditioning]:
        clip = _require_clip(clip, "CLIPTextEncodeSDXL")
        options = {"width": width, "height": height, "crop_w": crop_w, "crop_h": crop_h,
                   "target_width": target_width, "target_height": target_height}
        tokens = clip.tokenize_per_encoder({"g": text_g, "l": text_l})
        return (conditioning_for(clip, tokens, options),)


class CLIPTextEncodeSDXLRefiner(Node):
    schema = NodeSchema(
        "CLIPTextEncodeSDXLRefiner",
        (Float("ascore", 6.0, min=0.0, max=1000.0, step=0.01), Int("width", 1024, **SIZE),
         Int("height", 1024, **SIZE), _prompt("text"), Link("clip", "CLIP")),
        (Output("CONDITIONING"),), category="advanced/conditioning")

    def execute(self, ctx: NodeContext, ascore: float, width: int, height: int, text: str,
                clip: TextEncoderStack) -> tuple[Conditioning]:
        clip = _require_clip(clip, "CLIPTextEncodeSDXLRefiner")
        options = {"aesthetic_score": ascore, "width": width, "height": height}
        return (conditioning_for(clip, clip.tokenize(text), options),)


class CLIPSetLastLayer(Node):
    schema = NodeSchema(
        "CLIPSetLastLayer",
        (Link("clip", "CLIP"), Int("stop_at_clip_layer", -1, min=-24, max=-1, step=1)),
        (Output("CLIP"),), category="conditioning", display_name="CLIP Set Last Layer")

    def execute(self, ctx: NodeContext, clip: TextEncoderStack, stop_at_clip_layer: int
                ) -> tuple[TextEncoderStack]:
        return (_require_clip(clip, "CLIPSetLastLayer").clone_with_layer(stop_at_clip_layer),)


NODE_TYPES = (CLIPTextEncode, CLIPTextEncodeSDXL, CLIPTextEncodeSDXLRefiner, CLIPSetLastLayer)
