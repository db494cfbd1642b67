"""Conditioning nodes: combining, averaging and concatenating prompts, areas, masks, timestep
ranges and zeroing. They only annotate the [cond, options] pairs; the sampler applies them
(engine/diffusion/sampling/conditioning.py documents how)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from engine.context import NodeContext
from engine.node import Combo, Float, Int, Link, Node, NodeSchema, Output
from nodes.imaging import MAX_RESOLUTION

logger = logging.getLogger("loom.conditioning")
Conditioning = list[list[Any]]
SET_COND_AREA = ("default", "mask bounds")


def _conditioning(name: str = "conditioning") -> Any:
    return Link(name, "CONDITIONING")


def _strength() -> Any:
    return Float("strength", 1.0, min=0.0, max=10.0, step=0.01)


def _output() -> tuple[Output, ...]:
    return (Output("CONDITIONING"),)


def with_values(conditioning: Conditioning, values: Mapping[str, Any]) -> Conditioning:
    """A copy of every pair with `values` set in its options (the tensors are shared)."""
    return [[cond, {**options, **values}] for cond, options in _pairs(conditioning)]


def _pairs(conditioning: Any) -> list[tuple[Tensor, dict[str, Any]]]:
    if not isinstance(conditioning, list):
        raise TypeError(f"expected a CONDITIONING (a list of [tensor, options] pairs), got "
                        f"{type(conditioning).__name__}; connect a CLIPTextEncode")
    return [(pair[0], dict(pair[1])) for pair in conditioning]


def _first_cond(conditioning: Conditioning, node: str) -> tuple[Tensor, dict[str, Any]]:
    pairs = _pairs(conditioning)
    if not pairs:
        raise ValueError(f"{node}: conditioning_from is empty; connect a text encoding")
    if len(pairs) > 1:
        logger.warning("%s: conditioning_from holds %d entries; only the first is used",
                       node, len(pairs))
    return pairs[0]


class ConditioningCombine(Node):
    schema = NodeSchema(
        "ConditioningCombine", (_conditioning("conditioning_1"), _conditioning("conditioning_2")),
        _output(), category="conditioning", display_name="Conditioning (Combine)")

    def execute(self, ctx: NodeContext, conditioning_1: Conditioning,
                conditioning_2: Conditioning) -> tuple[Conditioning]:
        """Both lists of entries: each is predicted separately and the results averaged."""
        return (list(conditioning_1) + list(conditioning_2),)


class ConditioningAverage(Node):
    schema = NodeSchema(
        "ConditioningAverage",
        (_conditioning("conditioning_to"), _conditioning("conditioning_from"),
         Float("conditioning_to_strength", 1.0, min=0.0, max=1.0, step=0.01)),
        _output(), category="conditioning")

    def execute(self, ctx: NodeContext, conditioning_to: Conditioning,
                conditioning_from: Conditioning,
                conditioning_to_strength: float) -> tuple[Conditioning]:
        """to * strength + from * (1 - strength), token by token (from cut or zero-padded)."""
        cond_from, from_options = _first_cond(conditioning_from, "ConditioningAverage")
        pooled_from = from_options.get("pooled_output")
        weight = conditioning_to_strength
        out = []
        for cond_to, options in _pairs(conditioning_to):
            source = _fit_tokens(cond_from, cond_to.shape[1])
            mixed = torch.mul(cond_to, weight) + torch.mul(source, 1.0 - weight)
            pooled_to = options.get("pooled_output", pooled_from)
            if pooled_from is not None and pooled_to is not None:
                options["pooled_output"] = (torch.mul(pooled_to, weight)
                                            + torch.mul(pooled_from, 1.0 - weight))
            elif pooled_from is not None:
                options["pooled_output"] = pooled_from
            out.append([mixed, options])
        return (out,)


def _fit_tokens(cond: Tensor, tokens: int) -> Tensor:
    """`cond` cut to `tokens` tokens, or padded with zero tokens up to it."""
    cond = cond[:, :tokens]
    if cond.shape[1] < tokens:
        padding = cond.new_zeros((1, tokens - cond.shape[1], cond.shape[2]))
        cond = torch.cat([cond, padding], dim=1)
    return cond


class ConditioningConcat(Node):
    schema = NodeSchema(
        "ConditioningConcat", (_conditioning("conditioning_to"),
                               _conditioning("conditioning_from")),
        _output(), category="conditioning", display_name="Conditioning (Concat)")

    def execute(self, ctx: NodeContext, conditioning_to: Conditioning,
                conditioning_from: Conditioning) -> tuple[Conditioning]:
        """The tokens of conditioning_from appended to every entry of conditioning_to."""
        cond_from, _ = _first_cond(conditioning_from, "ConditioningConcat")
        return ([[torch.cat((cond_to, cond_from), 1), options]
                 for cond_to, options in _pairs(conditioning_to)],)


def _area_pixels(name: str, default: int, low: int) -> Any:
    return Int(name, default, min=low, max=MAX_RESOLUTION, step=8)


class ConditioningSetArea(Node):
    schema = NodeSchema(
        "ConditioningSetArea",
        (_conditioning(), _area_pixels("width", 64, 64), _area_pixels("height", 64, 64),
         _area_pixels("x", 0, 0), _area_pixels("y", 0, 0), _strength()),
        _output(), category="conditioning", display_name="Conditioning (Set Area)")

    def execute(self, ctx: NodeContext, conditioning: Conditioning, width: int, height: int,
                x: int, y: int, strength: float) -> tuple[Conditioning]:
        """The prompt applies to a pixel rectangle (stored in latent cells: pixels // 8)."""
        area = (height // 8, width // 8, y // 8, x // 8)
        return (with_values(conditioning, {"area": area, "strength": strength,
                                           "set_area_to_bounds": False}),)


def _fraction(name: str, default: float) -> Any:
    return Float(name, default, min=0, max=1.0, step=0.01)


class ConditioningSetAreaPercentage(Node):
    schema = NodeSchema(
        "ConditioningSetAreaPercentage",
        (_conditioning(), _fraction("width", 1.0), _fraction("height", 1.0), _fraction("x", 0),
         _fraction("y", 0), _strength()),
        _output(), category="conditioning",
        display_name="Conditioning (Set Area with Percentage)")

    def execute(self, ctx: NodeContext, conditioning: Conditioning, width: float,
                height: float, x: float, y: float, strength: float) -> tuple[Conditioning]:
        """An area as fractions of the latent, resolved when sampling."""
        area = ("percentage", height, width, y, x)
        return (with_values(conditioning, {"area": area, "strength": strength,
                                           "set_area_to_bounds": False}),)


class ConditioningSetAreaStrength(Node):
    schema = NodeSchema("ConditioningSetAreaStrength", (_conditioning(), _strength()),
                        _output(), category="conditioning")

    def execute(self, ctx: NodeContext, conditioning: Conditioning,
                strength: float) -> tuple[Conditioning]:
        return (with_values(conditioning, {"strength": strength}),)


class ConditioningSetMask(Node):
    schema = NodeSchema(
        "ConditioningSetMask",
        (_conditioning(), Link("mask", "MASK"), _strength(),
         Combo("set_cond_area", SET_COND_AREA)),
        _output(), category="conditioning", display_name="Conditioning (Set Mask)")

    def execute(self, ctx: NodeContext, conditioning: Conditioning, mask: Tensor,
                strength: float, set_cond_area: str) -> tuple[Conditioning]:
        """The prompt weighted by a mask; "mask bounds" also crops the model to its box."""
        if mask.ndim < 3:
            mask = mask.unsqueeze(0)
        return (with_values(conditioning, {"mask": mask, "mask_strength": strength,
                                           "set_area_to_bounds": set_cond_area != "default"}),)


class ConditioningSetTimestepRange(Node):
    schema = NodeSchema(
        "ConditioningSetTimestepRange",
        (_conditioning(), Float("start", 0.0, min=0.0, max=1.0, step=0.001),
         Float("end", 1.0, min=0.0, max=1.0, step=0.001)),
        _output(), category="advanced/conditioning")

    def execute(self, ctx: NodeContext, conditioning: Conditioning, start: float,
                end: float) -> tuple[Conditioning]:
        """The prompt is used only from `start` to `end` (fractions of the sampling run)."""
        return (with_values(conditioning, {"start_percent": start, "end_percent": end}),)


class ConditioningZeroOut(Node):
    schema = NodeSchema("ConditioningZeroOut", (_conditioning(),), _output(),
                        category="advanced/conditioning")

    def execute(self, ctx: NodeContext, conditioning: Conditioning) -> tuple[Conditioning]:
        """All-zero tokens and pooled output (SDXL's customary empty negative)."""
        out = []
        for cond, options in _pairs(conditioning):
            if options.get("pooled_output") is not None:
                options["pooled_output"] = torch.zeros_like(options["pooled_output"])
            out.append([torch.zeros_like(cond), options])
        return (out,)


NODE_TYPES = (ConditioningCombine, ConditioningAverage, ConditioningConcat, ConditioningSetArea,
              ConditioningSetAreaPercentage, ConditioningSetAreaStrength, ConditioningSetMask,
              ConditioningSetTimestepRange, ConditioningZeroOut)
