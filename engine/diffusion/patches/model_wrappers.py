"""Model function wrappers that change how the UNet itself runs, not what it computes:
another compute dtype (ComfyUI's ModelComputeDtype) and torch.compile (TorchCompileModel).

Both go in a MODEL's `model_function_wrapper` slot (model_patches.py) and keep the wrapper that
was there before as `inner`, so they compose with guidance patches set earlier. The UNet is
shared by every clone, so neither touches its weights: the dtype wrapper runs the forward with
cast copies of the current (patched, resident) weights, like ComfyUI's manual cast; the compile
wrapper points the UNet's forward at the compiled one only for the duration of its call, as
ComfyUI swaps in its compiled diffusion model for apply_model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from engine.diffusion.memory.cast_on_use import COMPUTE_DTYPE_ATTRIBUTE
from engine.diffusion.patches.model_patches import ApplyModel, GuidanceArgs, ModelFunctionWrapper

COMPILE_BACKENDS = ("inductor", "cudagraphs")


def call_inner(inner: ModelFunctionWrapper | None, apply: ApplyModel,
               args: GuidanceArgs) -> Tensor:
    """The previous wrapper on `apply`, or `apply` itself when there was none."""
    if inner is not None:
        return inner(apply, args)
    return apply(args["input"], args["timestep"], **args["c"])


class _Calling(nn.Module):
    """Holds the UNet as a child so torch.func.functional_call can swap its weights while an
    arbitrary callable (the sampler's apply_model) runs it."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, function: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
        return function(*args, **kwargs)


@dataclass(frozen=True, eq=False)
class ComputeDtype:
    """Runs the UNet in `dtype`: its floating-point weights and activations are cast for each
    call (the shared weights stay as loaded); the result comes back in the input's dtype."""

    unet: nn.Module
    dtype: torch.dtype
    inner: ModelFunctionWrapper | None = None

    def __call__(self, apply: ApplyModel, args: GuidanceArgs) -> Tensor:
        tensors = {**dict(self.unet.named_parameters()), **dict(self.unet.named_buffers())}
        held = getattr(self.unet, COMPUTE_DTYPE_ATTRIBUTE, None)
        if held == self.dtype or all(t.dtype == self.dtype for t in tensors.values()
                                     if t.is_floating_point()):
            return call_inner(self.inner, apply, args)  # it computes in `dtype` already
        cast = {f"unet.{name}": t.to(self.dtype) if t.is_floating_point() else t
                for name, t in tensors.items()}
        return torch.func.functional_call(_Calling(self.unet), cast,
                                          (call_inner, self.inner, apply, args))


@dataclass(frozen=True, eq=False)
class CompiledForward:
    """Runs the UNet's forward through torch.compile with `backend`. torch.compile is lazy:
    the graph is traced and compiled on the first call and reused while its guards hold."""

    unet: nn.Module
    backend: str
    inner: ModelFunctionWrapper | None = None
    compiled: Callable[..., Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.backend not in COMPILE_BACKENDS:
            raise ValueError(f"unknown torch.compile backend {self.backend!r}; use one of "
                             f"{', '.join(COMPILE_BACKENDS)}")
        forward = type(self.unet).forward.__get__(self.unet)
        object.__setattr__(self, "compiled", torch.compile(forward, backend=self.backend))

    def __call__(self, apply: ApplyModel, args: GuidanceArgs) -> Tensor:
        previous = self.unet.__dict__.get("forward")
        self.unet.forward = self.compiled
        try:
            return call_inner(self.inner, apply, args)
        finally:
            if previous is None:
                del self.unet.forward
            else:
                self.unet.forward = previous
