"""UNet and schedule patch nodes (ComfyUI's comfy_extras: nodes_freelunch, nodes_model_downscale,
nodes_attention_multiply, nodes_model_advanced's continuous schedules): each returns a clone of
the MODEL (or CLIP) with a patch point, a weight patch or a new sampling parameterisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from engine.context import NodeContext
from engine.diffusion.networks.model_sampling import continuous_model_sampling
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.patches.token_patches import HyperTile, TokenMerging
from engine.diffusion.patches.unet_tweaks import FreeU, scaled_parameters, scaled_rows
from engine.diffusion.patches.weight_patches import WeightDeltaPatch
from engine.diffusion.text.encoding import TextEncoderStack
from engine.node import Boolean, Combo, Float, Int, Link, Node, NodeSchema, Output
from nodes.imaging import LATENT_UPSCALE_METHODS, resize
from nodes.sampling import require_model

MODEL_IN = Link("model", "MODEL")
UNET_CATEGORY = "model_patches/unet"
ATTENTION_CATEGORY = "_for_testing/attention_experiments"
DOWNSCALE_METHODS = ("bicubic", "nearest-exact", "bilinear", "area", "bislerp")


def _freeu_inputs(b1: float, b2: float) -> tuple[Any, ...]:
    return (MODEL_IN, Float("b1", b1, min=0.0, max=10.0, step=0.01),
            Float("b2", b2, min=0.0, max=10.0, step=0.01),
            Float("s1", 0.9, min=0.0, max=10.0, step=0.01),
            Float("s2", 0.2, min=0.0, max=10.0, step=0.01))


class FreeUNode(Node):
    """FreeU's output_block_patch on a clone; FreeU_V2 scales by the backbone's mean map."""

    schema = NodeSchema("FreeU", _freeu_inputs(1.1, 1.2), (Output("MODEL"),),
                        category=UNET_CATEGORY)
    v2 = False

    def execute(self, ctx: NodeContext, model: Any, b1: float, b2: float, s1: float,
                s2: float) -> tuple[ModelHandle]:
        handle = require_model(model, self.schema.name)
        patch = FreeU.for_model(handle.config.model_channels, b1, b2, s1, s2, self.v2)
        return (handle.patching(lambda p: p.adding_unet_patch("output_block_patch", patch)),)


class FreeUV2(FreeUNode):
    schema = NodeSchema("FreeU_V2", _freeu_inputs(1.3, 1.4), (Output("MODEL"),),
                        category=UNET_CATEGORY)
    v2 = True


@dataclass(frozen=True)
class DeepShrink:
    """Kohya's "Deep Shrink": input block `block_number`'s output resized by 1 / factor while
    sigma lies in [sigma_end, sigma_start]; output_block_patch resizes h back to its skip."""

    block_number: int
    factor: float
    sigma_start: float
    sigma_end: float
    downscale_method: str
    upscale_method: str

    def input_patch(self, h: Tensor, options: dict[str, Any]) -> Tensor:
        if options["block"][1] != self.block_number:
            return h
        sigma = float(options["sigmas"][0])
        if not self.sigma_end <= sigma <= self.sigma_start:
            return h
        width = round(h.shape[-1] * (1.0 / self.factor))
        height = round(h.shape[-2] * (1.0 / self.factor))
        return resize(h, width, height, self.downscale_method)

    def output_patch(self, h: Tensor, skip: Tensor, options: Any) -> tuple[Tensor, Tensor]:
        if h.shape[2] != skip.shape[2]:
            h = resize(h, skip.shape[-1], skip.shape[-2], self.upscale_method)
        return h, skip


class PatchModelAddDownscale(Node):
    schema = NodeSchema(
        "PatchModelAddDownscale",
        (MODEL_IN, Int("block_number", 3, min=1, max=32, step=1),
         Float("downscale_factor", 2.0, min=0.1, max=9.0, step=0.001),
         Float("start_percent", 0.0, min=0.0, max=1.0, step=0.001),
         Float("end_percent", 0.35, min=0.0, max=1.0, step=0.001),
         Boolean("downscale_after_skip", True),
         Combo("downscale_method", DOWNSCALE_METHODS, combo_style="v3",
               options={"multiselect": False}),
         Combo("upscale_method", DOWNSCALE_METHODS, combo_style="v3",
               options={"multiselect": False})),
        (Output("MODEL"),), category=UNET_CATEGORY,
        display_name="PatchModelAddDownscale (Kohya Deep Shrink)")

    def execute(self, ctx: NodeContext, model: Any, block_number: int, downscale_factor: float,
                start_percent: float, end_percent: float, downscale_after_skip: bool,
                downscale_method: str, upscale_method: str) -> tuple[ModelHandle]:
        handle = require_model(model, "PatchModelAddDownscale")
        for method in (downscale_method, upscale_method):
            if method not in LATENT_UPSCALE_METHODS:
                raise ValueError(f"PatchModelAddDownscale: unknown method {method!r}; use one "
                                 f"of {', '.join(DOWNSCALE_METHODS)}")
        shrink = DeepShrink(block_number, downscale_factor,
                            handle.sampling.percent_to_sigma(start_percent),
                            handle.sampling.percent_to_sigma(end_percent), downscale_method,
                            upscale_method)
        point = "input_block_patch_after_skip" if downscale_after_skip else "input_block_patch"
        return (handle.patching(lambda p: p.adding_unet_patch(point, shrink.input_patch)
                                .adding_unet_patch("output_block_patch", shrink.output_patch)),)


def _multiplier_inputs(first: Any) -> tuple[Any, ...]:
    return (first, *(Float(name, 1.0, min=0.0, max=10.0, step=0.01)
                     for name in ("q", "k", "v", "out")))


class _UNetAttentionMultiply(Node):
    """Multiplies the q/k/v/out projection weights of every self- ("attn1") or cross-attention
    ("attn2") block, as a weight patch on a clone."""

    attention = "attn1"

    def execute(self, ctx: NodeContext, model: Any, q: float, k: float, v: float,
                out: float) -> tuple[ModelHandle]:
        handle = require_model(model, self.schema.name)
        name = self.attention
        patch = scaled_parameters(handle.unet, {f"{name}.to_q": q, f"{name}.to_k": k,
                                                f"{name}.to_v": v, f"{name}.to_out.0": out})
        return (handle.replace(patches=handle.patches + (patch,)),)


def _attention_multiply_schema(name: str) -> NodeSchema:
    return NodeSchema(name, _multiplier_inputs(MODEL_IN), (Output("MODEL"),),
                      category=ATTENTION_CATEGORY, experimental=True)


class UNetSelfAttentionMultiply(_UNetAttentionMultiply):
    schema = _attention_multiply_schema("UNetSelfAttentionMultiply")
    attention = "attn1"


class UNetCrossAttentionMultiply(_UNetAttentionMultiply):
    schema = _attention_multiply_schema("UNetCrossAttentionMultiply")
    attention = "attn2"


class CLIPAttentionMultiply(Node):
    schema = NodeSchema("CLIPAttentionMultiply", _multiplier_inputs(Link("clip", "CLIP")),
                        (Output("CLIP"),), category=ATTENTION_CATEGORY, experimental=True)

    def execute(self, ctx: NodeContext, clip: Any, q: float, k: float, v: float,
                out: float) -> tuple[TextEncoderStack]:
        if not isinstance(clip, TextEncoderStack):
            raise TypeError(f"CLIPAttentionMultiply: the clip input must be a CLIP (from a "
                            f"checkpoint or CLIP loader), got {type(clip).__name__}")
        patches = {}
        for name, module in clip.encoders.items():
            plain = scaled_parameters(module, {"q_proj": q, "k_proj": k, "v_proj": v,
                                               "out_proj": out})
            packed = scaled_rows(module, "in_proj", (q, k, v))  # OpenCLIP's stacked q/k/v
            patches[name] = WeightDeltaPatch(plain.deltas + packed.deltas)
        return (clip.clone_with_patches(patches),)


class HyperTileNode(Node):
    schema = NodeSchema(
        "HyperTile",
        (MODEL_IN, Int("tile_size", 256, min=1, max=2048), Int("swap_size", 2, min=1, max=128),
         Int("max_depth", 0, min=0, max=10), Boolean("scale_depth", False)),
        (Output("MODEL"),), category=UNET_CATEGORY)

    def execute(self, ctx: NodeContext, model: Any, tile_size: int, swap_size: int,
                max_depth: int, scale_depth: bool) -> tuple[ModelHandle]:
        tiles = HyperTile(tile_size, swap_size, max_depth, scale_depth)
        return (require_model(model, "HyperTile").patching(
            lambda p: p.adding_unet_patch("attn1_patch", tiles.split)
            .adding_unet_patch("attn1_output_patch", tiles.join)),)


class TomePatchModel(Node):
    schema = NodeSchema(
        "TomePatchModel", (MODEL_IN, Float("ratio", 0.3, min=0.0, max=1.0, step=0.01)),
        (Output("MODEL"),), category=UNET_CATEGORY)

    def execute(self, ctx: NodeContext, model: Any, ratio: float) -> tuple[ModelHandle]:
        merging = TokenMerging(ratio)
        return (require_model(model, "TomePatchModel").patching(
            lambda p: p.adding_unet_patch("attn1_patch", merging.merge)
            .adding_unet_patch("attn1_output_patch", merging.restore)),)


def _sigma_input(name: str, default: float) -> Any:
    return Float(name, default, min=0.0, max=1000.0, step=0.001, round=False)


class ModelSamplingContinuousEDM(Node):
    schema = NodeSchema(
        "ModelSamplingContinuousEDM",
        (MODEL_IN, Combo("sampling", ("v_prediction", "edm", "edm_playground_v2.5", "eps",
                                      "cosmos_rflow")),
         _sigma_input("sigma_max", 120.0), _sigma_input("sigma_min", 0.002)),
        (Output("MODEL"),), category="advanced/model")

    def validate(self, ctx: NodeContext, **inputs: Any) -> tuple[str, str] | None:
        sampling = inputs.get("sampling")
        if sampling in ("edm_playground_v2.5", "cosmos_rflow"):
            return ("sampling", f"{sampling!r} needs a model family Loom does not run "
                                f"(Playground v2.5's latent format, Cosmos); use v_prediction, "
                                f"edm or eps for SD1/SD2/SDXL models")
        return None

    def execute(self, ctx: NodeContext, model: Any, sampling: str, sigma_max: float,
                sigma_min: float) -> tuple[ModelHandle]:
        handle = require_model(model, "ModelSamplingContinuousEDM")
        sigma_data = 0.5 if sampling == "edm" else 1.0  # EDM's data std (Karras et al. 2022)
        return (handle.replace(sampling=continuous_model_sampling(
            sampling, sigma_min, sigma_max, sigma_data, timestep_kind="edm")),)


class ModelSamplingContinuousV(Node):
    schema = NodeSchema(
        "ModelSamplingContinuousV",
        (MODEL_IN, Combo("sampling", ("v_prediction",)), _sigma_input("sigma_max", 500.0),
         _sigma_input("sigma_min", 0.03)),
        (Output("MODEL"),), category="advanced/model")

    def execute(self, ctx: NodeContext, model: Any, sampling: str, sigma_max: float,
                sigma_min: float) -> tuple[ModelHandle]:
        handle = require_model(model, "ModelSamplingContinuousV")
        return (handle.replace(sampling=continuous_model_sampling(
            sampling, sigma_min, sigma_max, timestep_kind="v")),)


NODE_TYPES = (FreeUNode, FreeUV2, PatchModelAddDownscale, UNetSelfAttentionMultiply,
              UNetCrossAttentionMultiply, CLIPAttentionMultiply, ModelSamplingContinuousEDM,
              ModelSamplingContinuousV, HyperTileNode, TomePatchModel)
