"""CLIP vision and style-model nodes: load a CLIP vision tower and encode images with it, load
a T2I-Adapter style model and append its style tokens to a prompt's CONDITIONING."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.context import NodeContext
from engine.diffusion.checkpoints.state_files import open_state_file
from engine.diffusion.networks.clip_vision import (
    CROP_MODES,
    ClipVisionModel,
    ClipVisionOutput,
    load_clip_vision,
)
from engine.diffusion.networks.style_model import StyleAdapter, load_style_model
from engine.node import Combo, FilesIn, Float, Link, Node, NodeSchema, Output
from nodes.loaders import file_fingerprint, header_size, load_model_file, manager

STRENGTH_TYPES = ("multiply", "attn_bias")


@dataclass(frozen=True)
class FilesRecordedAs(FilesIn):
    """Files of `folder`, described by another folder's placeholder: ComfyUI's recorded schema
    shows CLIPVisionLoader's list as "<files in text_encoders>" though it reads clip_vision."""

    recorded_folder: str = ""

    def placeholder(self) -> str:
        return f"<files in {self.recorded_folder}>"


def _require(value: Any, expected: type, what: str, node: str) -> Any:
    if not isinstance(value, expected):
        raise TypeError(f"{node} needs a {what}, got {type(value).__name__}; connect the "
                        f"output of the matching loader/encoder node")
    return value


class CLIPVisionLoader(Node):
    schema = NodeSchema(
        "CLIPVisionLoader",
        (Combo("clip_name", FilesRecordedAs("clip_vision", recorded_folder="text_encoders")),),
        (Output("CLIP_VISION"),), category="loaders", display_name="Load CLIP Vision")

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        return file_fingerprint(ctx, "clip_vision", inputs["clip_name"])

    def execute(self, ctx: NodeContext, clip_name: str) -> tuple[ClipVisionModel]:
        return (load_model_file(
            ctx, "clip_vision", clip_name, "clip_vision",
            lambda models, path: load_clip_vision(
                open_state_file(path, allow_pickle=models.allow_pickle).tensors,
                dtype=models.policy.text_dtype, device=models.policy.offload_device),
            manager(ctx).policy, size=header_size(lambda policy: policy.text_dtype)),)


class CLIPVisionEncode(Node):
    schema = NodeSchema(
        "CLIPVisionEncode",
        (Link("clip_vision", "CLIP_VISION"), Link("image", "IMAGE"), Combo("crop", CROP_MODES)),
        (Output("CLIP_VISION_OUTPUT"),), category="conditioning",
        display_name="CLIP Vision Encode")

    def execute(self, ctx: NodeContext, clip_vision: Any, image: torch.Tensor,
                crop: str) -> tuple[ClipVisionOutput]:
        model = _require(clip_vision, ClipVisionModel, "CLIP_VISION", "CLIPVisionEncode")
        return (model.encode_image(image, crop),)


class StyleModelLoader(Node):
    schema = NodeSchema(
        "StyleModelLoader", (Combo("style_model_name", FilesIn("style_models")),),
        (Output("STYLE_MODEL"),), category="loaders", display_name="Load Style Model")

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        return file_fingerprint(ctx, "style_models", inputs["style_model_name"])

    def execute(self, ctx: NodeContext, style_model_name: str) -> tuple[StyleAdapter]:
        return (load_model_file(
            ctx, "style_models", style_model_name, "style_model",
            lambda models, path: load_style_model(
                open_state_file(path, allow_pickle=models.allow_pickle).tensors,
                dtype=models.policy.text_dtype, device=models.policy.offload_device),
            manager(ctx).policy, size=header_size(lambda policy: policy.text_dtype)),)


def append_tokens(conditioning: list[Any], tokens: torch.Tensor) -> list[list[Any]]:
    """New CONDITIONING with `tokens` (1, N, D) after each cond's tokens; inputs untouched."""
    appended = []
    for cond, options in conditioning:
        if cond.shape[-1] != tokens.shape[-1]:
            raise ValueError(f"style tokens are {tokens.shape[-1]} wide but the conditioning "
                             f"is {cond.shape[-1]} wide; use a style model made for this "
                             "model's text encoder (t2iadapter_style is for SD1.x, 768)")
        extra = tokens.to(device=cond.device, dtype=cond.dtype).expand(cond.shape[0], -1, -1)
        appended.append([torch.cat([cond, extra], dim=1), dict(options)])
    return appended


def attention_bias_entry(cond: torch.Tensor, options: dict[str, Any], style_tokens: int,
                         bias: float) -> dict[str, Any]:
    """`options` with ComfyUI's "attention_mask" grown for `style_tokens` tokens appended after
    the text: a float bias, log(bias) on the columns of the new tokens (an old mask keeps its
    quadrants; a boolean one becomes 0 / -inf). ComfyUI's SD UNets, like Loom's, do not read
    this mask; it is kept so that conditioning looks as ComfyUI's does."""
    text = cond.shape[1]
    ref_h, ref_w = options.get("attention_mask_img_shape", (1, 1))
    ref = ref_h * ref_w
    old = options.get("attention_mask")
    if old is None:
        old = torch.zeros((cond.shape[0], text + ref, text + ref), dtype=torch.float16)
    if old.dtype == torch.bool:
        old = torch.log(old.to(torch.float16))
    size = text + style_tokens + ref
    mask = torch.zeros((cond.shape[0], size, size), dtype=torch.float16)
    after = text + style_tokens
    mask[:, :text, :text] = old[:, :text, :text]
    mask[:, :text, after:] = old[:, :text, text:]
    mask[:, after:, :text] = old[:, text:, :text]
    mask[:, after:, after:] = old[:, text:, text:]
    log_bias = torch.log(torch.tensor(bias))
    mask[:, :text, text:after] = log_bias
    mask[:, after:, text:after] = log_bias
    return {**options, "attention_mask": mask.to(cond.device),
            "attention_mask_img_shape": (ref_h, ref_w)}


def apply_style(conditioning: list[Any], tokens: torch.Tensor, strength: float,
                strength_type: str) -> list[list[Any]]:
    """ComfyUI's StyleModelApply: "multiply" scales the style tokens by `strength`;
    "attn_bias" appends them unscaled and records log(strength) as an attention bias on them
    (entries that already carry an attention mask always get theirs grown)."""
    if strength_type == "multiply":
        tokens = tokens * strength
    bias = strength if strength_type == "attn_bias" else 1.0
    appended = append_tokens(conditioning, tokens)
    for entry, (cond, options) in zip(appended, conditioning, strict=True):
        if "attention_mask" in options or (strength_type == "attn_bias" and strength != 1.0):
            entry[1] = attention_bias_entry(cond, entry[1], tokens.shape[1], bias)
    return appended


class StyleModelApply(Node):
    schema = NodeSchema(
        "StyleModelApply",
        (Link("conditioning", "CONDITIONING"), Link("style_model", "STYLE_MODEL"),
         Link("clip_vision_output", "CLIP_VISION_OUTPUT"),
         Float("strength", 1.0, min=0.0, max=10.0, step=0.001),
         Combo("strength_type", STRENGTH_TYPES)),
        (Output("CONDITIONING"),), category="conditioning/style_model",
        display_name="Apply Style Model")

    def execute(self, ctx: NodeContext, conditioning: list[Any], style_model: Any,
                clip_vision_output: Any, strength: float,
                strength_type: str) -> tuple[list[list[Any]]]:
        adapter = _require(style_model, StyleAdapter, "STYLE_MODEL", "StyleModelApply")
        tokens = adapter.style_tokens(clip_vision_output["last_hidden_state"])
        return (apply_style(conditioning, tokens, strength, strength_type),)


NODE_TYPES = (CLIPVisionLoader, CLIPVisionEncode, StyleModelLoader, StyleModelApply)
