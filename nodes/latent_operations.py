"""Latent operations (ComfyUI's experimental latent/advanced/operations): a LATENT_OPERATION is
a callable `operation(latent=tensor) -> tensor`, as in ComfyUI, so custom nodes can make or
apply them. LatentApplyOperation runs one on a latent; LatentApplyOperationCFG patches a MODEL
so that, at every step, the operation acts on cond - uncond before CFG (a pre-CFG function)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.context import NodeContext
from engine.diffusion.patches.model_handle import ModelHandle
from engine.image_filters import sharpen
from engine.node import Float, Input, Int, Link, Node, NodeSchema, Output
from engine.values import Latent

LATENT_OPERATION = "LATENT_OPERATION"
REINHARD_EPS = 1e-10  # keeps an all-zero latent cell from dividing by zero
SHARPEN_EPS = 1e-6


@dataclass(frozen=True)
class TonemapReinhard:
    """Latent vector lengths compressed by Reinhard's x / (1 + x), with the white point at
    (mean + 5 std) of the lengths times `multiplier`; directions kept."""

    multiplier: float

    def __call__(self, latent: torch.Tensor, **_: Any) -> torch.Tensor:
        length = (torch.linalg.vector_norm(latent, dim=1) + REINHARD_EPS)[:, None]
        dims = list(range(1, length.dim()))
        mean = length.mean(dim=dims, keepdim=True)
        spread = length.std(dim=dims, keepdim=True)
        top = (spread * 5 + mean) * self.multiplier
        scaled = length * (1.0 / top)
        return latent / length * (scaled / (scaled + 1.0) * top)


@dataclass(frozen=True)
class SharpenLatent:
    """The latent's directions (unit channel vectors) sharpened with ComfyUI's unsharp kernel,
    then scaled back by the original lengths."""

    radius: int
    sigma: float
    alpha: float

    def __call__(self, latent: torch.Tensor, **_: Any) -> torch.Tensor:
        length = (torch.linalg.vector_norm(latent, dim=1) + SHARPEN_EPS)[:, None]
        return length * sharpen(latent / length, self.radius, self.sigma, self.alpha)


def apply_before_cfg(operation: Any, conds_out: list[torch.Tensor]) -> list[torch.Tensor]:
    """LatentApplyOperationCFG's step on the [cond, uncond] predictions: the operation acts on
    cond - uncond (or on cond alone without an uncond)."""
    result = list(conds_out)
    if len(result) == 2:
        result[0] = operation(latent=result[0] - result[1]) + result[1]
    else:
        result[0] = operation(latent=result[0])
    return result


@dataclass(frozen=True)
class OperationBeforeCfg:
    """A pre-CFG function (ComfyUI's signature: args dict -> conds_out) applying `operation`."""

    operation: Any

    def __call__(self, args: dict[str, Any]) -> list[torch.Tensor]:
        return apply_before_cfg(self.operation, args["conds_out"])


def _schema(name: str, inputs: tuple[Input, ...], output: str) -> NodeSchema:
    return NodeSchema(name, inputs, (Output(output),), category="latent/advanced/operations",
                      experimental=True, comfy_v3=True)


class LatentApplyOperation(Node):
    schema = _schema("LatentApplyOperation",
                     (Link("samples", "LATENT"), Link("operation", LATENT_OPERATION)), "LATENT")

    def execute(self, ctx: NodeContext, samples: Latent, operation: Any) -> tuple[Latent]:
        latent = Latent.of(samples)
        return (latent.replace(samples=operation(latent=latent.samples)),)


class LatentApplyOperationCFG(Node):
    schema = _schema("LatentApplyOperationCFG",
                     (Link("model", "MODEL"), Link("operation", LATENT_OPERATION)), "MODEL")

    def execute(self, ctx: NodeContext, model: ModelHandle, operation: Any
                ) -> tuple[ModelHandle]:
        return (model.patching(lambda patches: patches.adding_pre_cfg(
            OperationBeforeCfg(operation))),)


class LatentOperationTonemapReinhard(Node):
    schema = _schema("LatentOperationTonemapReinhard",
                     (Float("multiplier", 1.0, min=0.0, max=100.0, step=0.01),),
                     LATENT_OPERATION)

    def execute(self, ctx: NodeContext, multiplier: float) -> tuple[TonemapReinhard]:
        return (TonemapReinhard(multiplier),)


class LatentOperationSharpen(Node):
    schema = _schema("LatentOperationSharpen",
                     (Int("sharpen_radius", 9, min=1, max=31, step=1),
                      Float("sigma", 1.0, min=0.1, max=10.0, step=0.1),
                      Float("alpha", 0.1, min=0.0, max=5.0, step=0.01)), LATENT_OPERATION)

    def execute(self, ctx: NodeContext, sharpen_radius: int, sigma: float,
                alpha: float) -> tuple[SharpenLatent]:
        return (SharpenLatent(sharpen_radius, sigma, alpha),)


NODE_TYPES = (LatentApplyOperation, LatentApplyOperationCFG, LatentOperationTonemapReinhard,
              LatentOperationSharpen)
