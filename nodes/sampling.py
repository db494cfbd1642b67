"""Sampling nodes: KSampler, KSamplerAdvanced and ModelSamplingDiscrete. They offer every
sampler and scheduler name of ComfyUI, and each one runs."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from engine.context import NodeContext
from engine.diffusion.patches.model_handle import ModelHandle, family_sampling
from engine.diffusion.sampling import (
    COMFYUI_SAMPLER_NAMES,
    PREDICTIONS,
    SCHEDULER_NAMES,
)
from engine.diffusion.sampling.ksampler import StepProgress, preview_image, sample, wants_preview
from engine.node import Boolean, Combo, Float, Int, Link, Node, NodeSchema, Output
from engine.values import Latent

MAX_SEED = 0xFFFFFFFFFFFFFFFF
ENABLE_DISABLE = ("enable", "disable")


def seed_input(name: str) -> Any:
    return Int(name, 0, min=0, max=MAX_SEED, options={"control_after_generate": True})


def steps_input() -> Any:
    return Int("steps", 20, min=1, max=10000)


def cfg_input(name: str = "cfg") -> Any:
    return Float(name, 8.0, min=0.0, max=100.0, step=0.1, round=0.01)


def previews_enabled(ctx: NodeContext) -> bool:
    """False when the user started Loom with --preview-method none."""
    args = ctx.services.args
    return getattr(args, "preview_method", "auto") != "none"


def node_progress(ctx: NodeContext, model: ModelHandle) -> StepProgress:
    """Step progress for the node's context, with a live preview image where wanted."""
    previews = previews_enabled(ctx)

    def report(step: int, total: int, denoised: Tensor) -> None:
        image = None
        if previews and wants_preview(step, total, denoised):
            image = preview_image(model.latent_format, denoised)
        ctx.progress(step, total, image)

    return report


def require_model(model: Any, node: str) -> ModelHandle:
    if not isinstance(model, ModelHandle):
        raise TypeError(f"{node}: the model input must be a MODEL (from a checkpoint loader), "
                        f"got {type(model).__name__}")
    return model


class KSampler(Node):
    schema = NodeSchema(
        "KSampler",
        (Link("model", "MODEL"), seed_input("seed"), steps_input(), cfg_input(),
         Combo("sampler_name", COMFYUI_SAMPLER_NAMES), Combo("scheduler", SCHEDULER_NAMES),
         Link("positive", "CONDITIONING"), Link("negative", "CONDITIONING"),
         Link("latent_image", "LATENT"),
         Float("denoise", 1.0, min=0.0, max=1.0, step=0.01)),
        (Output("LATENT"),), category="sampling", display_name="KSampler",
        description="Denoises a latent with a model guided by a positive and a negative "
                    "prompt (denoise < 1 keeps part of the input: img2img).")

    def execute(self, ctx: NodeContext, model: ModelHandle, seed: int, steps: int, cfg: float,
                sampler_name: str, scheduler: str, positive: Any, negative: Any,
                latent_image: Latent, denoise: float) -> tuple[Latent]:
        model = require_model(model, "KSampler")
        return (sample(model, positive, negative, latent_image, seed=seed, steps=steps, cfg=cfg,
                       sampler_name=sampler_name, scheduler=scheduler, denoise=denoise,
                       progress=node_progress(ctx, model)),)


class KSamplerAdvanced(Node):
    schema = NodeSchema(
        "KSamplerAdvanced",
        (Link("model", "MODEL"), Combo("add_noise", ENABLE_DISABLE), seed_input("noise_seed"),
         steps_input(), cfg_input(), Combo("sampler_name", COMFYUI_SAMPLER_NAMES),
         Combo("scheduler", SCHEDULER_NAMES), Link("positive", "CONDITIONING"),
         Link("negative", "CONDITIONING"), Link("latent_image", "LATENT"),
         Int("start_at_step", 0, min=0, max=10000), Int("end_at_step", 10000, min=0, max=10000),
         Combo("return_with_leftover_noise", ("disable", "enable"))),
        (Output("LATENT"),), category="sampling", display_name="KSampler (Advanced)",
        description="KSampler over a part of the schedule, with or without added noise: "
                    "base -> refiner hand-offs.")

    def execute(self, ctx: NodeContext, model: ModelHandle, add_noise: str, noise_seed: int,
                steps: int, cfg: float, sampler_name: str, scheduler: str, positive: Any,
                negative: Any, latent_image: Latent, start_at_step: int, end_at_step: int,
                return_with_leftover_noise: str) -> tuple[Latent]:
        model = require_model(model, "KSamplerAdvanced")
        return (sample(model, positive, negative, latent_image, seed=noise_seed, steps=steps,
                       cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                       add_noise=add_noise == "enable", start_step=start_at_step,
                       end_step=end_at_step,
                       force_full_denoise=return_with_leftover_noise != "enable",
                       progress=node_progress(ctx, model)),)


class ModelSamplingDiscrete(Node):
    schema = NodeSchema(
        "ModelSamplingDiscrete",
        (Link("model", "MODEL"), Combo("sampling", PREDICTIONS), Boolean("zsnr", False)),
        (Output("MODEL"),), category="advanced/model",
        description="Overrides what the model predicts (eps, v, LCM, x0) and optionally "
                    "rescales its schedule to zero terminal SNR.")

    def execute(self, ctx: NodeContext, model: ModelHandle, sampling: str,
                zsnr: bool) -> tuple[ModelHandle]:
        model = require_model(model, "ModelSamplingDiscrete")
        return (model.replace(sampling=family_sampling(model.family, sampling, zsnr)),)


NODE_TYPES = (KSampler, KSamplerAdvanced, ModelSamplingDiscrete)
