"""Custom sampling nodes: a sampler, a schedule (SIGMAS), a noise and a guider chosen
separately and joined by SamplerCustom(Advanced), as in ComfyUI.

Types: SIGMAS is a descending 1-D float tensor; SAMPLER a `SamplerChoice`; NOISE a
`RandomNoise` / `DisabledNoise` (`.seed`, `generate_noise(latent)`); GUIDER a `Guider`."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from engine.context import NodeContext
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.sampling import (
    COMFYUI_SAMPLER_NAMES,
    SCHEDULER_NAMES,
    exponential,
    karras,
    polyexponential,
    sd_turbo,
)
from engine.diffusion.sampling.guidance import Guider
from engine.diffusion.sampling.ksampler import (
    DisabledNoise,
    NoiseGenerator,
    RandomNoise,
    SamplerChoice,
    default_sigmas,
    sample_custom,
)
from engine.node import Boolean, Combo, Float, Int, Link, Node, NodeSchema, Output
from engine.values import Latent
from nodes.sampling import (
    cfg_input,
    node_progress,
    require_model,
    sampler_name_error,
    seed_input,
    steps_input,
)

CATEGORY = "sampling/custom_sampling"
FLIPPED_ZERO_SIGMA = 0.0001  # FlipSigmas: a schedule may not start at sigma 0


def _sigma_range(name: str) -> Any:
    return Float(name, 14.614642 if name == "sigma_max" else 0.0291675, min=0.0, max=5000.0,
                 step=0.01, round=False)


def _rho(default: float) -> Any:
    return Float("rho", default, min=0.0, max=100.0, step=0.01, round=False)


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

    def execute(self, ctx: NodeContext, noise: NoiseGenerator, guider: Guider,
                sampler: SamplerChoice, sigmas: Tensor,
                latent_image: Latent) -> tuple[Latent, Latent]:
        if not isinstance(guider, Guider):
            raise TypeError(f"SamplerCustomAdvanced: the guider input must be a GUIDER from "
                            f"CFGGuider or BasicGuider, got {type(guider).__name__}")
        return sample_custom(guider, sampler, sigmas, noise, latent_image,
                             progress=node_progress(ctx, guider.model))


class KSamplerSelect(Node):
    schema = NodeSchema(
        "KSamplerSelect", (Combo("sampler_name", COMFYUI_SAMPLER_NAMES, combo_style="v3"),),
        (Output("SAMPLER"),), category=f"{CATEGORY}/samplers")

    def validate(self, ctx: NodeContext, **inputs: Any) -> tuple[str, str] | None:
        return sampler_name_error(inputs.get("sampler_name"))

    def execute(self, ctx: NodeContext, sampler_name: str) -> tuple[SamplerChoice]:
        return (SamplerChoice(sampler_name),)


class BasicScheduler(Node):
    schema = NodeSchema(
        "BasicScheduler",
        (Link("model", "MODEL"), Combo("scheduler", SCHEDULER_NAMES, combo_style="v3"),
         steps_input(), Float("denoise", 1.0, min=0.0, max=1.0, step=0.01)),
        (Output("SIGMAS"),), category=f"{CATEGORY}/schedulers")

    def execute(self, ctx: NodeContext, model: ModelHandle, scheduler: str, steps: int,
                denoise: float) -> tuple[Tensor]:
        model = require_model(model, "BasicScheduler")
        return (default_sigmas(model, scheduler, steps, denoise),)


class KarrasScheduler(Node):
    schema = NodeSchema(
        "KarrasScheduler",
        (steps_input(), _sigma_range("sigma_max"), _sigma_range("sigma_min"), _rho(7.0)),
        (Output("SIGMAS"),), category=f"{CATEGORY}/schedulers")

    def execute(self, ctx: NodeContext, steps: int, sigma_max: float, sigma_min: float,
                rho: float) -> tuple[Tensor]:
        return (karras(steps, sigma_min, sigma_max, rho),)


class ExponentialScheduler(Node):
    schema = NodeSchema(
        "ExponentialScheduler",
        (steps_input(), _sigma_range("sigma_max"), _sigma_range("sigma_min")),
        (Output("SIGMAS"),), category=f"{CATEGORY}/schedulers")

    def execute(self, ctx: NodeContext, steps: int, sigma_max: float,
                sigma_min: float) -> tuple[Tensor]:
        return (exponential(steps, sigma_min, sigma_max),)


class PolyexponentialScheduler(Node):
    schema = NodeSchema(
        "PolyexponentialScheduler",
        (steps_input(), _sigma_range("sigma_max"), _sigma_range("sigma_min"), _rho(1.0)),
        (Output("SIGMAS"),), category=f"{CATEGORY}/schedulers")

    def execute(self, ctx: NodeContext, steps: int, sigma_max: float, sigma_min: float,
                rho: float) -> tuple[Tensor]:
        return (polyexponential(steps, sigma_min, sigma_max, rho),)


class SDTurboScheduler(Node):
    schema = NodeSchema(
        "SDTurboScheduler",
        (Link("model", "MODEL"), Int("steps", 1, min=1, max=10),
         Float("denoise", 1.0, min=0, max=1.0, step=0.01)),
        (Output("SIGMAS"),), category=f"{CATEGORY}/schedulers")

    def execute(self, ctx: NodeContext, model: ModelHandle, steps: int,
                denoise: float) -> tuple[Tensor]:
        model = require_model(model, "SDTurboScheduler")
        return (sd_turbo(model.sampling, steps, denoise).cpu(),)


class SplitSigmas(Node):
    schema = NodeSchema(
        "SplitSigmas", (Link("sigmas", "SIGMAS"), Int("step", 0, min=0, max=10000)),
        (Output("SIGMAS", "high_sigmas"), Output("SIGMAS", "low_sigmas")),
        category=f"{CATEGORY}/sigmas")

    def execute(self, ctx: NodeContext, sigmas: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Steps before `step` and from `step` on; both halves hold sigmas[step]."""
        return (sigmas[:step + 1], sigmas[step:])


class FlipSigmas(Node):
    schema = NodeSchema("FlipSigmas", (Link("sigmas", "SIGMAS"),), (Output("SIGMAS"),),
                        category=f"{CATEGORY}/sigmas")

    def execute(self, ctx: NodeContext, sigmas: Tensor) -> tuple[Tensor]:
        """The schedule reversed (for unsampling); a leading 0 becomes 0.0001."""
        if len(sigmas) == 0:
            return (sigmas,)
        flipped = sigmas.flip(0)
        if flipped[0] == 0:
            flipped[0] = FLIPPED_ZERO_SIGMA
        return (flipped,)


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


class RandomNoiseNode(Node):
    schema = NodeSchema("RandomNoise", (seed_input("noise_seed"),), (Output("NOISE"),),
                        category=f"{CATEGORY}/noise")

    def execute(self, ctx: NodeContext, noise_seed: int) -> tuple[RandomNoise]:
        return (RandomNoise(noise_seed),)


class DisableNoise(Node):
    schema = NodeSchema("DisableNoise", (), (Output("NOISE"),), category=f"{CATEGORY}/noise")

    def execute(self, ctx: NodeContext) -> tuple[DisabledNoise]:
        return (DisabledNoise(),)


NODE_TYPES = (SamplerCustom, SamplerCustomAdvanced, KSamplerSelect, BasicScheduler,
              KarrasScheduler, ExponentialScheduler, PolyexponentialScheduler, SDTurboScheduler,
              SplitSigmas, FlipSigmas, BasicGuider, CFGGuider, RandomNoiseNode, DisableNoise)
