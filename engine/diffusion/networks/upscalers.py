"""Image upscale models through spandrel (the library ComfyUI uses): it detects the architecture
from a state dict's keys and shapes (ESRGAN / Real-ESRGAN, SwinIR, HAT, DAT, OmniSR, SPAN,
Compact, ...) and builds the network; `UpscaleNet` keeps what the upscale nodes need of it.

spandrel imports torchvision for two architectures that are not upscalers (LaMa inpainting
and RestoreFormer face restoration), and PyPI's torchvision wheels do not load beside a CPU
build of torch. Where torchvision cannot be imported, `import_spandrel` registers, only while
spandrel imports, a stand-in module holding the three names those two import: `normalize`
(the plain per-channel formula) and `InterpolationMode` work; `rotate` raises, saying LaMa
needs a working torchvision."""

from __future__ import annotations

import contextlib
import enum
import importlib
import logging
import sys
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger("loom.upscale")
# Swin-family files saved from DataParallel training prefix every key with "module."
DATA_PARALLEL_MARKER = "module.layers.0.residual_group.blocks.0.norm1.weight"


class UpscaleModelError(ValueError):
    """A file that is not a single-image model spandrel knows; the message says what it is."""


class _InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


def _normalize(tensor: Tensor, mean: Sequence[float], std: Sequence[float],
               inplace: bool = False) -> Tensor:
    """(tensor - mean) / std per channel of a (..., C, H, W) tensor."""
    shape = (-1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(shape)
    std_t = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(shape)
    return tensor.sub_(mean_t).div_(std_t) if inplace else (tensor - mean_t) / std_t


def _rotate(*_: Any, **__: Any) -> Tensor:
    raise UpscaleModelError("this model (LaMa) rotates images with torchvision, which cannot be "
                            "imported beside this PyTorch build; install a torchvision built "
                            "for it to use the model")


def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    """`torchvision.transforms.functional` holding the three names spandrel imports."""
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = _InterpolationMode  # type: ignore[attr-defined]
    functional.normalize = _normalize  # type: ignore[attr-defined]
    functional.rotate = _rotate  # type: ignore[attr-defined]
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional  # type: ignore[attr-defined]
    package = types.ModuleType("torchvision")
    package.transforms = transforms  # type: ignore[attr-defined]
    return {"torchvision": package, "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional}


def _torchvision_entries() -> list[str]:
    return [key for key in sys.modules if key.split(".")[0] == "torchvision"]


@contextlib.contextmanager
def _stand_in_while_importing() -> Iterator[None]:
    """The stand-in is in sys.modules only while spandrel imports (its two modules bind the
    names then): afterwards `import torchvision` elsewhere (transformers, packs) sees the real
    state of the environment, not Loom's three names."""
    for name in _torchvision_entries():
        del sys.modules[name]  # a half-imported broken torchvision
    sys.modules.update(_torchvision_stand_in())
    try:
        yield
    finally:
        for name in _torchvision_entries():
            del sys.modules[name]


def import_spandrel() -> types.ModuleType:
    """spandrel, with the torchvision stand-in (module docstring) where torchvision fails."""
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    try:
        importlib.import_module("torchvision.transforms.functional")
    except Exception as exc:  # noqa: BLE001 -- a broken torchvision raises RuntimeError etc.
        logger.debug("torchvision unavailable (%s); spandrel gets Loom's stand-in", exc)
        with _stand_in_while_importing():
            return importlib.import_module("spandrel")
    return importlib.import_module("spandrel")


@dataclass(frozen=True, eq=False)
class UpscaleNet:
    """A loaded upscale model: spandrel's descriptor (which pads inputs to the sizes the
    architecture needs) and its facts. `module` is the network the model manager places."""

    descriptor: Any
    architecture: str
    scale: int
    in_channels: int
    out_channels: int

    @property
    def module(self) -> nn.Module:
        return self.descriptor.model

    def __call__(self, pixels: Tensor) -> Tensor:
        """(B, in_channels, H, W) in 0..1 -> (B, out_channels, H * scale, W * scale)."""
        return self.descriptor(pixels)


def build_upscaler(state: Mapping[str, Tensor], source: str, dtype: torch.dtype,
                   device: torch.device) -> UpscaleNet:
    """The single-image model in `state`, detected and built by spandrel, in eval mode."""
    spandrel = import_spandrel()
    state = dict(state)
    if DATA_PARALLEL_MARKER in state:
        state = {key.removeprefix("module."): value for key, value in state.items()}
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(state)
    except spandrel.UnsupportedModelError as exc:
        raise UpscaleModelError(
            f"{source}: spandrel recognises no architecture in this file ({len(state)} "
            f"tensors, e.g. {sorted(state)[:3]}); it is not an upscale model, or one of an "
            f"architecture spandrel does not know") from exc
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise UpscaleModelError(f"{source}: a {descriptor.architecture.name} model is not a "
                                f"single-image model; upscale models take one image")
    descriptor.to(device=device, dtype=dtype).eval()
    descriptor.model.requires_grad_(False)
    return UpscaleNet(descriptor, descriptor.architecture.name, int(descriptor.scale),
                      descriptor.input_channels, descriptor.output_channels)
