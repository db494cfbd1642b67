"""Guidance patch nodes (ComfyUI's comfy_extras: nodes_model_advanced RescaleCFG, nodes_lumina2
RenormCFG (model-independent, so offered for SD too), nodes_cfg, nodes_apg, nodes_tcfg,
nodes_mahiro, nodes_fresca, nodes_eps, nodes_pag, nodes_sag, nodes_perpneg,
nodes_differential_diffusion): each returns a clone of the MODEL with its guidance
functions on its ModelPatches (engine/diffusion/sampling/guidance_patches.py, perp_neg.py and
self_attention_guidance.py have the equations)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.context import NodeContext
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.patches.model_patches import ModelPatches
from engine.diffusion.sampling import guidance_patches as patches
from engine.diffusion.sampling.conditioning import Conditioning
from engine.diffusion.sampling.perp_neg import PerpNegGuider, perp_neg_cfg_function
from engine.diffusion.sampling.self_attention_guidance import SelfAttentionGuidance
from engine.node import Float, Int, Link, Node, NodeSchema, Output
from nodes.sampling import cfg_input, require_model

MODEL_IN = Link("model", "MODEL")
PATCHED = (Output("MODEL", "patched_model"),)
NUMBER = {"display": "number"}


def patched(model: Any, node: str, change: Callable[[ModelPatches], ModelPatches]
            ) -> tuple[ModelHandle]:
    return (require_model(model, node).patching(change),)


class RescaleCFG(Node):
    schema = NodeSchema(
        "RescaleCFG", (MODEL_IN, Float("multiplier", 0.7, min=0.0, max=1.0, step=0.01)),
        (Output("MODEL"),), category="advanced/model")

    def execute(self, ctx: NodeContext, model: Any, multiplier: float) -> tuple[ModelHandle]:
        return patched(model, "RescaleCFG",
                       lambda p: p.with_cfg_function(patches.rescale_cfg(multiplier)))


class RenormCFG(Node):
    schema = NodeSchema(
        "RenormCFG",
        (MODEL_IN, Float("cfg_trunc", 100, min=0.0, max=100.0, step=0.01),
         Float("renorm_cfg", 1.0, min=0.0, max=100.0, step=0.01)),
        (Output("MODEL"),), category="advanced/model")

    def execute(self, ctx: NodeContext, model: Any, cfg_trunc: float,
                renorm_cfg: float) -> tuple[ModelHandle]:
        handle = require_model(model, "RenormCFG")
        function = patches.renorm_cfg(cfg_trunc, renorm_cfg, handle.config.in_channels)
        return (handle.patching(lambda p: p.with_cfg_function(function)),)


class CFGZeroStar(Node):
    schema = NodeSchema("CFGZeroStar", (MODEL_IN,), PATCHED, category="advanced/guidance")

    def execute(self, ctx: NodeContext, model: Any) -> tuple[ModelHandle]:
        return patched(model, "CFGZeroStar", lambda p: p.adding_post_cfg(patches.cfg_zero_star))


class CFGNorm(Node):
    schema = NodeSchema(
        "CFGNorm", (MODEL_IN, Float("strength", 1.0, min=0.0, max=100.0, step=0.01)), PATCHED,
        category="advanced/guidance", experimental=True)

    def execute(self, ctx: NodeContext, model: Any, strength: float) -> tuple[ModelHandle]:
        return patched(model, "CFGNorm",
                       lambda p: p.adding_post_cfg(patches.cfg_norm(strength)))


class APG(Node):
    schema = NodeSchema(
        "APG",
        (MODEL_IN, Float("eta", 1.0, min=-10.0, max=10.0, step=0.01),
         Float("norm_threshold", 5.0, min=0.0, max=50.0, step=0.1),
         Float("momentum", 0.0, min=-5.0, max=1.0, step=0.01)),
        (Output("MODEL"),), category="sampling/custom_sampling",
        display_name="Adaptive Projected Guidance")

    def execute(self, ctx: NodeContext, model: Any, eta: float, norm_threshold: float,
                momentum: float) -> tuple[ModelHandle]:
        guidance = patches.AdaptiveProjectedGuidance(eta, norm_threshold, momentum)
        return patched(model, "APG", lambda p: p.adding_pre_cfg(guidance))


class TCFG(Node):
    schema = NodeSchema(
        "TCFG", (MODEL_IN,), PATCHED, category="advanced/guidance",
        display_name="Tangential Damping CFG",
        description="TCFG – Tangential Damping CFG (2503.18137)\n\nRefine the uncond "
                    "(negative) to align with the cond (positive) for improving quality.")

    def execute(self, ctx: NodeContext, model: Any) -> tuple[ModelHandle]:
        return patched(model, "TCFG", lambda p: p.adding_pre_cfg(patches.tcfg))


class Mahiro(Node):
    schema = NodeSchema(
        "Mahiro", (MODEL_IN,), PATCHED, category="_for_testing", display_name="Mahiro CFG",
        experimental=True,
        description="Modify the guidance to scale more on the 'direction' of the positive "
                    "prompt rather than the difference between the negative prompt.")

    def execute(self, ctx: NodeContext, model: Any) -> tuple[ModelHandle]:
        return patched(model, "Mahiro", lambda p: p.adding_post_cfg(patches.mahiro))


class FreSca(Node):
    schema = NodeSchema(
        "FreSca",
        (MODEL_IN, Float("scale_low", 1.0, min=0, max=10, step=0.01),
         Float("scale_high", 1.25, min=0, max=10, step=0.01),
         Int("freq_cutoff", 20, min=1, max=10000, step=1)),
        (Output("MODEL"),), category="_for_testing", display_name="FreSca", experimental=True,
        description="Applies frequency-dependent scaling to the guidance")

    def execute(self, ctx: NodeContext, model: Any, scale_low: float, scale_high: float,
                freq_cutoff: int) -> tuple[ModelHandle]:
        return patched(model, "FreSca", lambda p: p.adding_pre_cfg(
            patches.fresca(scale_low, scale_high, freq_cutoff)))


class EpsilonScaling(Node):
    schema = NodeSchema(
        "Epsilon Scaling",
        (MODEL_IN, Float("scaling_factor", 1.005, min=0.5, max=1.5, step=0.001, options=NUMBER)),
        (Output("MODEL"),), category="model_patches/unet")

    def execute(self, ctx: NodeContext, model: Any, scaling_factor: float) -> tuple[ModelHandle]:
        return patched(model, "Epsilon Scaling",
                       lambda p: p.adding_post_cfg(patches.epsilon_scaling(scaling_factor)))


class TemporalScoreRescaling(Node):
    schema = NodeSchema(
        "TemporalScoreRescaling",
        (MODEL_IN, Float("tsr_k", 0.95, min=0.01, max=100.0, step=0.001, options=NUMBER),
         Float("tsr_sigma", 1.0, min=0.01, max=100.0, step=0.001, options=NUMBER)),
        PATCHED, category="model_patches/unet", display_name="TSR - Temporal Score Rescaling",
        description="[Post-CFG Function]\nTSR - Temporal Score Rescaling (2510.01184)\n\n"
                    "Rescaling the model's score or noise to steer the sampling diversity.\n")

    def execute(self, ctx: NodeContext, model: Any, tsr_k: float,
                tsr_sigma: float) -> tuple[ModelHandle]:
        return patched(model, "TemporalScoreRescaling", lambda p: p.adding_post_cfg(
            patches.temporal_score_rescaling(tsr_k, tsr_sigma)))


class PerturbedAttentionGuidance(Node):
    schema = NodeSchema(
        "PerturbedAttentionGuidance",
        (MODEL_IN, Float("scale", 3.0, min=0.0, max=100.0, step=0.01, round=0.01)),
        (Output("MODEL"),), category="model_patches/unet")

    def execute(self, ctx: NodeContext, model: Any, scale: float) -> tuple[ModelHandle]:
        return patched(model, "PerturbedAttentionGuidance", lambda p: p.adding_post_cfg(
            patches.perturbed_attention_guidance(scale)))


class DifferentialDiffusion(Node):
    schema = NodeSchema(
        "DifferentialDiffusion",
        (MODEL_IN, Float("strength", 1.0, min=0.0, max=1.0, step=0.01, optional=True)),
        (Output("MODEL"),), category="_for_testing", display_name="Differential Diffusion",
        experimental=True)

    def execute(self, ctx: NodeContext, model: Any, strength: float = 1.0
                ) -> tuple[ModelHandle]:
        return patched(model, "DifferentialDiffusion", lambda p: p.with_denoise_mask_function(
            patches.differential_diffusion(strength)))


class SelfAttentionGuidanceNode(Node):
    schema = NodeSchema(
        "SelfAttentionGuidance",
        (MODEL_IN, Float("scale", 0.5, min=-2.0, max=5.0, step=0.01),
         Float("blur_sigma", 2.0, min=0.0, max=10.0, step=0.1)),
        (Output("MODEL"),), category="_for_testing", display_name="Self-Attention Guidance",
        experimental=True)

    def execute(self, ctx: NodeContext, model: Any, scale: float,
                blur_sigma: float) -> tuple[ModelHandle]:
        guidance = SelfAttentionGuidance(scale, blur_sigma)
        return patched(model, "SelfAttentionGuidance", lambda p: p.replacing_attention(
            "attn1", ("middle", 0, 0), guidance.record).adding_post_cfg(
            guidance.post_cfg, disable_cfg1_optimization=True))


def neg_scale_input() -> Any:
    return Float("neg_scale", 1.0, min=0.0, max=100.0, step=0.01)


class PerpNeg(Node):
    schema = NodeSchema(
        "PerpNeg", (MODEL_IN, Link("empty_conditioning", "CONDITIONING"), neg_scale_input()),
        (Output("MODEL"),), category="_for_testing",
        display_name="Perp-Neg (DEPRECATED by PerpNegGuider)", deprecated=True,
        experimental=True)

    def execute(self, ctx: NodeContext, model: Any, empty_conditioning: Conditioning,
                neg_scale: float) -> tuple[ModelHandle]:
        return patched(model, "PerpNeg", lambda p: p.with_cfg_function(
            perp_neg_cfg_function(empty_conditioning, neg_scale)))


class PerpNegGuiderNode(Node):
    schema = NodeSchema(
        "PerpNegGuider",
        (MODEL_IN, Link("positive", "CONDITIONING"), Link("negative", "CONDITIONING"),
         Link("empty_conditioning", "CONDITIONING"), cfg_input(), neg_scale_input()),
        (Output("GUIDER"),), category="_for_testing", experimental=True)

    def execute(self, ctx: NodeContext, model: Any, positive: Conditioning,
                negative: Conditioning, empty_conditioning: Conditioning, cfg: float,
                neg_scale: float) -> tuple[PerpNegGuider]:
        return (PerpNegGuider(require_model(model, "PerpNegGuider"), positive, negative, cfg,
                              empty_conditioning, neg_scale),)


NODE_TYPES = (RescaleCFG, RenormCFG, CFGZeroStar, CFGNorm, APG, TCFG, Mahiro, FreSca,
              EpsilonScaling, TemporalScoreRescaling, PerturbedAttentionGuidance,
              DifferentialDiffusion, PerpNeg, PerpNegGuiderNode, SelfAttentionGuidanceNode)
