"""SAMPLER nodes of custom sampling: KSamplerSelect and the nodes that expose one sampler's
settings (ComfyUI's comfy_extras samplers). Each returns a `SamplerChoice` over the sampler
registry, except SamplerLCMUpscale and SamplerEulerCFG++'s "alternative", which build their
own sampler function."""

from __future__ import annotations

from functools import partial
from typing import Any

from engine.context import NodeContext
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.sampling import COMFYUI_SAMPLER_NAMES, SamplerOptions, SamplerSpec
from engine.diffusion.sampling.ksampler import SamplerChoice
from engine.diffusion.sampling.sa_solver import sde_interval
from engine.diffusion.sampling.samplers_cfg_pp import euler_cfg_pp_alternative
from engine.diffusion.sampling.samplers_common import (
    DPMPP_SOLVER_TYPES,
    ER_SDE_SOLVER_TYPES,
    SEEDS_SOLVER_TYPES,
)
from engine.diffusion.sampling.samplers_euler import lcm_upscale
from engine.node import Combo, Float, Input, Int, Link, Node, NodeSchema, Output
from nodes.imaging import LATENT_UPSCALE_METHODS, resize
from nodes.sampling import require_model

CATEGORY = "sampling/custom_sampling/samplers"
NOISE_DEVICES = ("gpu", "cpu")  # where the SDE samplers' Brownian tree lives
# SamplerLCMUpscale lists bislerp first (ComfyUI's order for this node).
LCM_UPSCALE_METHODS = ("bislerp",) + tuple(m for m in LATENT_UPSCALE_METHODS if m != "bislerp")
EULER_CFG_PP_VERSIONS = ("regular", "alternative")


def _setting(name: str, default: float, max: float = 100.0) -> Input:
    """A FLOAT sampler setting as ComfyUI declares them (0..max in steps of 0.01, unrounded)."""
    return Float(name, default, min=0.0, max=max, step=0.01, round=False)


def _choice(name: str, choices: tuple[str, ...]) -> Input:
    return Combo(name, choices, combo_style="v3")


def _schema(name: str, inputs: tuple[Input, ...], **kw: Any) -> NodeSchema:
    return NodeSchema(name, inputs, (Output("SAMPLER"),), category=kw.pop("category", CATEGORY),
                      **kw)


def _sde_name(base: str, noise_device: str) -> str:
    """The registry name for an SDE sampler whose Brownian tree lives on noise_device."""
    return base if noise_device == "cpu" else f"{base}_gpu"


class KSamplerSelect(Node):
    schema = _schema("KSamplerSelect", (_choice("sampler_name", COMFYUI_SAMPLER_NAMES),))

    def execute(self, ctx: NodeContext, sampler_name: str) -> tuple[SamplerChoice]:
        return (SamplerChoice(sampler_name),)


class SamplerEulerAncestral(Node):
    schema = _schema("SamplerEulerAncestral", (_setting("eta", 1.0), _setting("s_noise", 1.0)))

    def execute(self, ctx: NodeContext, eta: float, s_noise: float) -> tuple[SamplerChoice]:
        return (SamplerChoice("euler_ancestral", SamplerOptions(eta=eta, s_noise=s_noise)),)


class SamplerEulerAncestralCFGPP(Node):
    schema = _schema("SamplerEulerAncestralCFGPP",
                     (_setting("eta", 1.0, max=1.0), _setting("s_noise", 1.0, max=10.0)),
                     display_name="SamplerEulerAncestralCFG++")

    def execute(self, ctx: NodeContext, eta: float, s_noise: float) -> tuple[SamplerChoice]:
        options = SamplerOptions(eta=eta, s_noise=s_noise)
        return (SamplerChoice("euler_ancestral_cfg_pp", options),)


class SamplerEulerCFGpp(Node):
    schema = _schema("SamplerEulerCFGpp", (_choice("version", EULER_CFG_PP_VERSIONS),),
                     category="_for_testing", display_name="SamplerEulerCFG++",
                     experimental=True)

    def execute(self, ctx: NodeContext, version: str) -> tuple[SamplerChoice]:
        if version == "alternative":
            spec = SamplerSpec("euler_cfg_pp_alternative", euler_cfg_pp_alternative)
            return (SamplerChoice(spec.name, built=spec),)
        return (SamplerChoice("euler_cfg_pp"),)


class SamplerLMS(Node):
    schema = _schema("SamplerLMS", (Int("order", 4, min=1, max=100),))

    def execute(self, ctx: NodeContext, order: int) -> tuple[SamplerChoice]:
        return (SamplerChoice("lms", SamplerOptions(order=order)),)


class SamplerDPMPP_2M_SDE(Node):
    schema = _schema("SamplerDPMPP_2M_SDE",
                     (_choice("solver_type", DPMPP_SOLVER_TYPES), _setting("eta", 1.0),
                      _setting("s_noise", 1.0), _choice("noise_device", NOISE_DEVICES)))

    def execute(self, ctx: NodeContext, solver_type: str, eta: float, s_noise: float,
                noise_device: str) -> tuple[SamplerChoice]:
        options = SamplerOptions(eta=eta, s_noise=s_noise, solver_type=solver_type)
        return (SamplerChoice(_sde_name("dpmpp_2m_sde", noise_device), options),)


class SamplerDPMPP_3M_SDE(Node):
    schema = _schema("SamplerDPMPP_3M_SDE",
                     (_setting("eta", 1.0), _setting("s_noise", 1.0),
                      _choice("noise_device", NOISE_DEVICES)))

    def execute(self, ctx: NodeContext, eta: float, s_noise: float,
                noise_device: str) -> tuple[SamplerChoice]:
        options = SamplerOptions(eta=eta, s_noise=s_noise)
        return (SamplerChoice(_sde_name("dpmpp_3m_sde", noise_device), options),)


class SamplerDPMPP_SDE(Node):
    schema = _schema("SamplerDPMPP_SDE",
                     (_setting("eta", 1.0), _setting("s_noise", 1.0), _setting("r", 0.5),
                      _choice("noise_device", NOISE_DEVICES)))

    def execute(self, ctx: NodeContext, eta: float, s_noise: float, r: float,
                noise_device: str) -> tuple[SamplerChoice]:
        options = SamplerOptions(eta=eta, s_noise=s_noise, r=r)
        return (SamplerChoice(_sde_name("dpmpp_sde", noise_device), options),)


class SamplerDPMPP_2S_Ancestral(Node):
    schema = _schema("SamplerDPMPP_2S_Ancestral",
                     (_setting("eta", 1.0), _setting("s_noise", 1.0)))

    def execute(self, ctx: NodeContext, eta: float, s_noise: float) -> tuple[SamplerChoice]:
        return (SamplerChoice("dpmpp_2s_ancestral", SamplerOptions(eta=eta, s_noise=s_noise)),)


class SamplerDPMAdaptative(Node):
    schema = _schema("SamplerDPMAdaptative",
                     (Int("order", 3, min=2, max=3), _setting("rtol", 0.05),
                      _setting("atol", 0.0078), _setting("h_init", 0.05),
                      _setting("pcoeff", 0.0), _setting("icoeff", 1.0), _setting("dcoeff", 0.0),
                      _setting("accept_safety", 0.81), _setting("eta", 0.0),
                      _setting("s_noise", 1.0)))

    def execute(self, ctx: NodeContext, **settings: Any) -> tuple[SamplerChoice]:
        return (SamplerChoice("dpm_adaptive", SamplerOptions(**settings)),)


class SamplerER_SDE(Node):
    schema = _schema("SamplerER_SDE",
                     (_choice("solver_type", ER_SDE_SOLVER_TYPES),
                      Int("max_stage", 3, min=1, max=3), _setting("eta", 1.0),
                      _setting("s_noise", 1.0)))

    def execute(self, ctx: NodeContext, solver_type: str, max_stage: int, eta: float,
                s_noise: float) -> tuple[SamplerChoice]:
        """eta scales the noise of the "Reverse-time SDE" only (see samplers_seeds.er_sde)."""
        options = SamplerOptions(solver_type=solver_type, max_stage=max_stage, eta=eta,
                                 s_noise=s_noise)
        return (SamplerChoice("er_sde", options),)


class SamplerSASolver(Node):
    schema = _schema("SamplerSASolver",
                     (Link("model", "MODEL"), _setting("eta", 1.0, max=10.0),
                      Float("sde_start_percent", 0.2, min=0.0, max=1.0, step=0.001),
                      Float("sde_end_percent", 0.8, min=0.0, max=1.0, step=0.001),
                      _setting("s_noise", 1.0), Int("predictor_order", 3, min=1, max=6),
                      Int("corrector_order", 4, min=0, max=6), Input("use_pece", "BOOLEAN"),
                      Input("simple_order_2", "BOOLEAN")))

    def execute(self, ctx: NodeContext, model: ModelHandle, eta: float,
                sde_start_percent: float, sde_end_percent: float, s_noise: float,
                predictor_order: int, corrector_order: int, use_pece: bool,
                simple_order_2: bool) -> tuple[SamplerChoice]:
        """The SDE interval is given in sampling percents and turned into sigmas of `model`."""
        sampling = require_model(model, "SamplerSASolver").sampling
        start, end = sde_interval(sampling, sde_start_percent, sde_end_percent)
        options = SamplerOptions(eta=eta, s_noise=s_noise, predictor_order=predictor_order,
                                 corrector_order=corrector_order, use_pece=use_pece,
                                 simple_order_2=simple_order_2, sde_start_sigma=start,
                                 sde_end_sigma=end)
        return (SamplerChoice("sa_solver", options),)


class SamplerSEEDS2(Node):
    schema = _schema("SamplerSEEDS2",
                     (_choice("solver_type", SEEDS_SOLVER_TYPES), _setting("eta", 1.0),
                      _setting("s_noise", 1.0),
                      Float("r", 0.5, min=0.01, max=1.0, step=0.01, round=False)),
                     description="SEEDS-2 with its settings; solver_type phi_2, r 1 and eta 0 "
                                 "give exp_heun_2_x0, the same with eta 1 exp_heun_2_x0_sde.")

    def execute(self, ctx: NodeContext, solver_type: str, eta: float, s_noise: float,
                r: float) -> tuple[SamplerChoice]:
        options = SamplerOptions(solver_type=solver_type, eta=eta, s_noise=s_noise, r=r)
        return (SamplerChoice("seeds_2", options),)


class SamplerLCMUpscale(Node):
    schema = _schema("SamplerLCMUpscale",
                     (Float("scale_ratio", 1.0, min=0.1, max=20.0, step=0.01),
                      Int("scale_steps", -1, min=-1, max=1000, step=1),
                      _choice("upscale_method", LCM_UPSCALE_METHODS)))

    def execute(self, ctx: NodeContext, scale_ratio: float, scale_steps: int,
                upscale_method: str) -> tuple[SamplerChoice]:
        """scale_steps -1: the first half of the steps (plus one) do the enlarging."""
        upscale = partial(resize, method=upscale_method)
        function = lcm_upscale(upscale, scale_ratio, None if scale_steps < 0 else scale_steps)
        spec = SamplerSpec("lcm_upscale", function)
        return (SamplerChoice(spec.name, built=spec),)


NODE_TYPES = (KSamplerSelect, SamplerEulerAncestral, SamplerEulerAncestralCFGPP,
              SamplerEulerCFGpp, SamplerLMS, SamplerDPMPP_2M_SDE, SamplerDPMPP_3M_SDE,
              SamplerDPMPP_SDE, SamplerDPMPP_2S_Ancestral, SamplerDPMAdaptative, SamplerER_SDE,
              SamplerSASolver, SamplerSEEDS2, SamplerLCMUpscale)
