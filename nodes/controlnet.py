"""ControlNet and T2I-Adapter nodes: loaders, and the apply nodes that attach a control to each
entry of a CONDITIONING (a list of [cond, options]) under options["control"].

The apply nodes return new lists with copied options dicts (inputs are never mutated); applying
to a conditioning that already has a control chains onto it (the residuals add up)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from engine.context import NodeContext
from engine.diffusion.checkpoints.controlnet_loader import control_holding, load_control_model
from engine.diffusion.checkpoints.state_files import open_state_file
from engine.diffusion.networks.controlnet import ControlNet
from engine.diffusion.networks.controlnet_union import UNION_TYPES, check_types
from engine.diffusion.patches.control import Control, ControlModel
from engine.diffusion.patches.model_handle import ModelHandle
from engine.node import Combo, FilesIn, Float, Link, Node, NodeSchema, Output
from nodes.loaders import file_fingerprint, header_size, load_model_file, manager

Conditioning = list[list[Any]]
CATEGORY = "conditioning/controlnet"


def _strength() -> Any:
    return Float("strength", 1.0, min=0.0, max=10.0, step=0.01)


def _percent(name: str, default: float) -> Any:
    return Float(name, default, min=0.0, max=1.0, step=0.001)


def load_control_file(ctx: NodeContext, name: str, base: ModelHandle | None = None
                      ) -> ControlModel:
    """A ControlNet/T2I-Adapter from the controlnet folder, shared via the model manager (a
    diff ControlNet once per base model handle)."""
    policy = manager(ctx).policy
    options: tuple[Any, ...] = (policy,) if base is None else (policy, base)
    return load_model_file(
        ctx, "controlnet", name, "controlnet",
        lambda models, path: load_control_model(
            open_state_file(path, allow_pickle=models.allow_pickle), models.policy, base),
        *options, size=header_size(control_holding))


class ControlNetLoader(Node):
    schema = NodeSchema(
        "ControlNetLoader", (Combo("control_net_name", FilesIn("controlnet")),),
        (Output("CONTROL_NET"),), category="loaders", display_name="Load ControlNet Model",
        description="Loads a ControlNet (original or diffusers layout; SD1.x, SD2.x, SDXL) or a "
                    "T2I-Adapter.")

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        return file_fingerprint(ctx, "controlnet", inputs["control_net_name"])

    def execute(self, ctx: NodeContext, control_net_name: str) -> tuple[ControlModel]:
        return (load_control_file(ctx, control_net_name),)


class DiffControlNetLoader(Node):
    schema = NodeSchema(
        "DiffControlNetLoader",
        (Link("model", "MODEL"), Combo("control_net_name", FilesIn("controlnet"))),
        (Output("CONTROL_NET"),), category="loaders", display_name="Load ControlNet Model (diff)",
        description="Loads a 'diff' ControlNet, whose weights are differences to the model's.")

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        return file_fingerprint(ctx, "controlnet", inputs["control_net_name"])

    def execute(self, ctx: NodeContext, model: ModelHandle, control_net_name: str
                ) -> tuple[ControlModel]:
        return (load_control_file(ctx, control_net_name, model),)


def hint_from_image(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, C] -> the channels-first hint [B, C, H, W]."""
    if image.ndim != 4:
        raise ValueError(f"image has shape {tuple(image.shape)}; expected an IMAGE batch "
                         "[B, H, W, C]")
    return image.movedim(-1, 1)


def attach(conditioning: Conditioning, make: Callable[[Control | None], Control],
           apply_to_uncond: bool) -> Conditioning:
    """New entries whose copied options hold `make(the entry's current control or None)`."""
    out = []
    for cond, options in conditioning:
        copied = dict(options)
        copied["control"] = make(options.get("control"))
        copied["control_apply_to_uncond"] = apply_to_uncond
        out.append([cond, copied])
    return out


class ControlNetApply(Node):
    """The old single-conditioning node: always active; with control_apply_to_uncond set, the
    guidance also applies the control to a negative conditioning that has none."""

    schema = NodeSchema(
        "ControlNetApply",
        (Link("conditioning", "CONDITIONING"), Link("control_net", "CONTROL_NET"),
         Link("image", "IMAGE"), _strength()),
        (Output("CONDITIONING"),), category=CATEGORY, display_name="Apply ControlNet (OLD)",
        deprecated=True)

    def execute(self, ctx: NodeContext, conditioning: Conditioning, control_net: ControlModel,
                image: torch.Tensor, strength: float) -> tuple[Conditioning]:
        if strength == 0:
            return (conditioning,)
        hint = hint_from_image(image)
        return (attach(conditioning, lambda previous: Control(  # one per entry, as ComfyUI
            control_net, hint, strength, previous=previous), apply_to_uncond=True),)


def _apply_advanced(positive: Conditioning, negative: Conditioning, control_net: ControlModel,
                    image: torch.Tensor, strength: float, start_percent: float,
                    end_percent: float, vae: Any = None) -> tuple[Conditioning, Conditioning]:
    """ControlNetApplyAdvanced's rule: one Control per previous control, shared by the positive
    and negative entries chained onto it."""
    if strength == 0:
        return positive, negative
    hint = hint_from_image(image)
    made: dict[Control | None, Control] = {}

    def make(previous: Control | None) -> Control:
        if previous not in made:
            made[previous] = Control(control_net, hint, strength, start_percent, end_percent,
                                     previous, vae)
        return made[previous]

    return (attach(positive, make, apply_to_uncond=False),
            attach(negative, make, apply_to_uncond=False))


class ControlNetApplyAdvanced(Node):
    schema = NodeSchema(
        "ControlNetApplyAdvanced",
        (Link("positive", "CONDITIONING"), Link("negative", "CONDITIONING"),
         Link("control_net", "CONTROL_NET"), Link("image", "IMAGE"), _strength(),
         _percent("start_percent", 0.0), _percent("end_percent", 1.0),
         Link("vae", "VAE", optional=True)),
        (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative")),
        category=CATEGORY, display_name="Apply ControlNet",
        description="Steers sampling with a ControlNet or T2I-Adapter and a hint image, from "
                    "start_percent to end_percent of the schedule. The vae input is for "
                    "ControlNets with latent-space hints; pixel-hint ControlNets ignore it.")

    def execute(self, ctx: NodeContext, positive: Conditioning, negative: Conditioning,
                control_net: ControlModel, image: torch.Tensor, strength: float,
                start_percent: float, end_percent: float, vae: Any = None
                ) -> tuple[Conditioning, Conditioning]:
        return _apply_advanced(positive, negative, control_net, image, strength, start_percent,
                               end_percent, vae)


class SetUnionControlNetType(Node):
    """Tells a ControlNet-Union which control type its hint is ("auto": none); a copy of the
    CONTROL_NET carries the choice. Other ControlNets take it and ignore it, as in ComfyUI."""

    schema = NodeSchema(
        "SetUnionControlNetType",
        (Link("control_net", "CONTROL_NET"),
         Combo("type", ("auto", *UNION_TYPES), combo_style="v3")),
        (Output("CONTROL_NET"),), category=CATEGORY,
        python_module="comfy_extras.nodes_controlnet", comfy_v3=True)

    def execute(self, ctx: NodeContext, control_net: ControlModel, type: str
                ) -> tuple[ControlModel]:
        selected = () if type == "auto" else (UNION_TYPES[type],)
        network = control_net.network
        if isinstance(network, ControlNet) and network.config.union_types:
            check_types(selected, network.config.union_types, control_net.name)
        return (dataclasses.replace(control_net, control_type=selected),)


class ControlNetInpaintingAliMamaApply(Node):
    """ComfyUI's inpainting-ControlNet apply. ComfyUI masks the image and adds the mask as an
    extra hint channel only for ControlNets built for it (17 latent hint channels: the AliMama
    SD3/Flux models, which Loom does not run); for the SD1/SD2/SDXL ControlNets Loom loads it
    applies the image as ControlNetApplyAdvanced does, the mask unused. Loom does the same."""

    schema = NodeSchema(
        "ControlNetInpaintingAliMamaApply",
        (Link("positive", "CONDITIONING"), Link("negative", "CONDITIONING"),
         Link("control_net", "CONTROL_NET"), Link("vae", "VAE"), Link("image", "IMAGE"),
         Link("mask", "MASK"), _strength(), _percent("start_percent", 0.0),
         _percent("end_percent", 1.0)),
        (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative")),
        category=CATEGORY, python_module="comfy_extras.nodes_controlnet", comfy_v3=True)

    def execute(self, ctx: NodeContext, positive: Conditioning, negative: Conditioning,
                control_net: ControlModel, vae: Any, image: torch.Tensor, mask: torch.Tensor,
                strength: float, start_percent: float, end_percent: float
                ) -> tuple[Conditioning, Conditioning]:
        return _apply_advanced(positive, negative, control_net, image, strength, start_percent,
                               end_percent, vae)


NODE_TYPES = (ControlNetLoader, DiffControlNetLoader, ControlNetApply, ControlNetApplyAdvanced,
              SetUnionControlNetType, ControlNetInpaintingAliMamaApply)
