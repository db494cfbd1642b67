"""Custom sampling nodes: a sampler, a schedule (SIGMAS), a noise and a guider chosen
separately and joined by SamplerCustom(Advanced), as in ComfyUI. The SAMPLER and SIGMAS
nodes live in nodes/custom_samplers.py and nodes/custom_schedulers.py.

Types: SIGMAS is a descending 1-D float tensor; SAMPLER a `SamplerChoice`; NOISE a
`RandomNoise` / `DisabledNoise` (`.seed`, `generate_noise(latent)`); GUIDER a
`SamplingGuider` (`Guider`, `DualCFGGuider`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from engine.context import NodeContext
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.sampling.dual_guidance import DUAL_CFG_STYLES, DualCFGGuider
from engine.diffusion.sampling.guidance import Guider
from engine.diffusion.sampling.ksampler import (
    DisabledNoise,
    NoiseGenerator,
    RandomNoise,
    SamplerChoice,
    SamplingGuider,
    sample_custom,
)
from engine.node import Boolean, Combo, Link, Node, NodeSchema, Output
from engine.values import Latent
from nodes.sampling import cfg_input, node_progress, require_model, seed_input

CATEGORY = "sampling/custom_sampling"


def _sampling_outputs() -> tuple[Output, ...]:
    return (Output("LATENT", "output"), Output("LATENT", "denoised_output"))


class SamplerCustom(Node):
    schema = NodeSchema(
        "SamplerCustom",
        (Link("model", "MODEL"), Boolean("add_noise", True), seed_input("noise_seed"),
         cfg_input(), Link("positive", "CONDITIONING"), Link("negative", "CONDITIONING"),
         Link("sampler", "SAMPLER"), Link("sigmas", "SIGMAS"), Link("latent_image", "LATENT")),
        _sampling_outputs(), category=CATEGORY)

    def execute(self, ctx: NodeContext, model: ModelHandle, add_noise: bool, noise_seed: int,
                cfg: float, positive: Any, negative: Any, sampler: SamplerChoice,
                sigmas: Tensor, latent_image: Latent) -> tuple[Latent, Latent]:
        model = require_model(model, "SamplerCustom")
        noise = RandomNoise(noise_seed) if add_noise else DisabledNoise()
        return sample_custom(Guider(model, positive, negative, cfg), sampler, sigmas, noise,
                             latent_image, seed=noise_seed, progress=node_progress(ctx, model))


class SamplerCustomAdvanced(Node):
    schema = NodeSchema(
        "SamplerCustomAdvanced",
        (Link("noise", "NOISE"), Link("guider", "GUIDER"), Link("sampler", "SAMPLER"),
         Link("sigmas", "SIGMAS"), Link("latent_image", "LATENT")),
        _sampling_outputs(), category=CATEGORY)

    def execute(self, ctx: NodeContext, noise: NoiseGenerator, guider: SamplingGuider,
                sampler: SamplerChoice, sigmas: Tensor,
                latent_image: Latent) -> tuple[Latent, Latent]:
        if not isinstance(guider, SamplingGuider):
            raise TypeError(f"SamplerCustomAdvanced: the guider input must be a GUIDER from "
                            f"CFGGuider, BasicGuider or DualCFGGuider, got "
                            f"{type(guider).__name__}")
        return sample_custom(guider, sampler, sigmas, noise, latent_image,
                             progress=node_progress(ctx, guider.model))


class BasicGuider(Node):
    schema = NodeSchema(
        "BasicGuider", (Link("model", "MODEL"), Link("conditioning", "CONDITIONING")),
        (Output("GUIDER"),), category=f"{CATEGORY}/guiders")

    def execute(self, ctx: NodeContext, model: ModelHandle, conditioning: Any) -> tuple[Guider]:
        return (Guider(require_model(model, "BasicGuider"), conditioning),)


class CFGGuider(Node):
    schema = NodeSchema(
        "CFGGuider",
        (Link("model", "MODEL"), Link("positive", "CONDITIONING"),
         Link("negative", "CONDITIONING"), cfg_input()),
        (Output("GUIDER"),), category=f"{CATEGORY}/guiders")

    def execute(self, ctx: NodeContext, model: ModelHandle, positive: Any, negative: Any,
                cfg: float) -> tuple[Guider]:
        return (Guider(require_model(model, "CFGGuider"), positive, negative, cfg),)


class DualCFGGuiderNode(Node):
    schema = NodeSchema(
        "DualCFGGuider",
        (Link("model", "MODEL"), Link("cond1", "CONDITIONING"), Link("cond2", "CONDITIONING"),
         Link("negative", "CONDITIONING"), cfg_input("cfg_conds"),
         cfg_input("cfg_cond2_negative"), Combo("style", DUAL_CFG_STYLES, combo_style="v3")),
        (Output("GUIDER"),), category=f"{CATEGORY}/guiders",
        description="Guides towards cond1 relative to cond2 (cfg_conds) and towards cond2 "
                    "relative to the negative (cfg_cond2_negative).")

    def execute(self, ctx: NodeContext, model: ModelHandle, cond1: Any, cond2: Any,
                negative: Any, cfg_conds: float, cfg_cond2_negative: float,
                style: str) -> tuple[DualCFGGuider]:
        model = require_model(model, "DualCFGGuider")
        return (DualCFGGuider(model, cond1, cond2, negative, cfg_conds, cfg_cond2_negative,
                              style),)


class RandomNoiseNode(Node):
    schema = NodeSchema("RandomNoise", (seed_input("noise_seed"),), (Output("NOISE"),),
                        category=f"{CATEGORY}/noise")

    def execute(self, ctx: NodeContext, noise_seed: int) -> tuple[RandomNoise]:
        return (RandomNoise(noise_seed),)


class DisableNoise(Node):
    schema = NodeSchema("DisableNoise", (), (Output("NOISE"),), category=f"{CATEGORY}/noise")

    def execute(self, ctx: NodeContext) -> tuple[DisabledNoise]:
        return (DisabledNoise(),)


class AddNoise(Node):
    schema = NodeSchema(
        "AddNoise",
        (Link("model", "MODEL"), Link("noise", "NOISE"), Link("sigmas", "SIGMAS"),
         Link("latent_image", "LATENT")),
        (Output("LATENT"),), category="_for_testing/custom_sampling/noise", experimental=True)

    def execute(self, ctx: NodeContext, model: ModelHandle, noise: NoiseGenerator,
                sigmas: Tensor, latent_image: Latent) -> tuple[Latent]:
        """The latent plus the noise at the schedule's span |sigmas[0] - sigmas[-1]| (or at
        sigmas[0] alone), for sampling it later with DisableNoise."""
        model = require_model(model, "AddNoise")
        latent = Latent.of(latent_image)
        if len(sigmas) == 0:
            return (latent,)
        return (latent.replace(samples=add_noise(model, noise.generate_noise(latent), sigmas,
                                                 latent.samples)),)


def add_noise(model: ModelHandle, noise: Tensor, sigmas: Tensor, samples: Tensor) -> Tensor:
    """Raw-space latent + sigma * noise; an all-zero latent stays unscaled (as ComfyUI)."""
    sigma = (sigmas[0] - sigmas[-1]).abs() if len(sigmas) > 1 else sigmas[0]
    scale = model.latent_format.scale
    image = samples * scale if torch.count_nonzero(samples) > 0 else samples
    noisy = model.sampling.noise_scaling(sigma, noise, image) / scale
    return torch.nan_to_num(noisy, nan=0.0, posinf=0.0, neginf=0.0)


NODE_TYPES = (SamplerCustom, SamplerCustomAdvanced, BasicGuider, CFGGuider, DualCFGGuiderNode,
              RandomNoiseNode, DisableNoise, AddNoise)
