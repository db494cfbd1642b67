"""Where a loaded model's weights are: resting on the offload device (CPU RAM), copied to the
compute device (the GPU), or split: some layers resident there, the others copied in for each
forward and dropped after it (partial loading, ComfyUI's --lowvram / --novram).

The model manager (memory/model_manager.py) keeps one Placement per top-level module
and decides under a VRAM budget which to load, which to offload (least recently used first)
and which to load partially. Weights never leave the offload device: loading copies them to the
compute device and offloading drops the copies, so an offload costs no transfer and gives back
exactly the tensors that were there before."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

logger = logging.getLogger("loom.models")

GB = 2**30
# ComfyUI's defaults: 0.4 GB kept for the OS and other programs (--reserve-vram overrides it)
# and 0.8 GB for activations ("minimum inference memory").
DEFAULT_OS_RESERVE = 400 * 2**20
INFERENCE_RESERVE = int(0.8 * GB)
# --lowvram: weights may fill 1/1.3 of the budget, leaving the rest to activations (the share
# ComfyUI's lowvram mode gave the weights when it split models).
LOWVRAM_SHARE = 1 / 1.3
# Layers whose weights only their own forward reads, so they can be copied in per forward.
# Other tensors (embedding tables read as `.weight`, parameters held directly by container
# modules) stay resident whenever the model is loaded.
STREAMABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.LayerNorm)
# Attribute the model manager sets on a module it manages: the device the module computes on.
COMPUTE_DEVICE = "_loom_compute_device"


def compute_device(module: nn.Module) -> torch.device:
    """Where `module` computes: the model manager's compute device when it manages the module
    (its weights may rest on the offload device until used), else where its weights are."""
    device = getattr(module, COMPUTE_DEVICE, None)
    return device if device is not None else next(module.parameters()).device


class VramMode(Enum):
    """ComfyUI's VRAM flags."""

    NORMAL = "normalvram"  # load whole models, offload the least recently used to fit
    LOW = "lowvram"  # as NORMAL within a smaller share of the budget
    NO = "novram"  # nothing resident that can be streamed
    HIGH = "highvram"  # once on the GPU, models stay there
    GPU_ONLY = "gpu-only"  # weights are loaded straight onto the GPU and stay there

    @property
    def keeps_models(self) -> bool:
        return self in (VramMode.HIGH, VramMode.GPU_ONLY)


@dataclass(frozen=True)
class MemoryInfo:
    """Memory of the compute device: `free` counts what a new allocation can use (the driver's
    free memory plus what torch's allocator holds unused)."""

    total: int
    free: int


MemoryProbe = Callable[[], MemoryInfo]


def cuda_memory_probe(device: torch.device) -> MemoryProbe:
    def probe() -> MemoryInfo:
        free, total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return MemoryInfo(total, free + cached)

    return probe


def reserve_bytes(reserve_vram_gb: float | None) -> int:
    """VRAM kept out of the weights' budget: --reserve-vram GB for the OS and other programs
    (default 0.4 GB), plus 0.8 GB for activations."""
    if reserve_vram_gb is not None and reserve_vram_gb < 0:
        raise ValueError(f"--reserve-vram must be >= 0 GB, got {reserve_vram_gb}")
    kept = DEFAULT_OS_RESERVE if reserve_vram_gb is None else int(reserve_vram_gb * GB)
    return kept + INFERENCE_RESERVE


@dataclass(frozen=True)
class VramSettings:
    """How the model manager uses the compute device's memory."""

    probe: MemoryProbe
    mode: VramMode = VramMode.NORMAL
    reserve: int = field(default_factory=lambda: reserve_bytes(None))
    smart_memory: bool = True  # False (--disable-smart-memory): offload all other models first

    @classmethod
    def from_args(cls, args: Any, probe: MemoryProbe) -> VramSettings:
        """From main.py's parsed flags (ComfyUI's names; missing flags count as not given)."""
        flag = lambda name: bool(getattr(args, name, False))  # noqa: E731
        mode = next((m for m in VramMode if flag(m.value.replace("-", "_"))), VramMode.NORMAL)
        return cls(probe, mode, reserve_bytes(getattr(args, "reserve_vram", None)),
                   smart_memory=not flag("disable_smart_memory"))

    def budget(self) -> int:
        """Bytes of weights that may be on the compute device at once."""
        room = max(0, self.probe().total - self.reserve)
        if self.mode is VramMode.NO:
            return 0
        if self.mode is VramMode.LOW:
            return int(room * LOWVRAM_SHARE)
        return room


class LayerState(Enum):
    OFFLOADED = "offloaded"
    RESIDENT = "resident"
    STREAMED = "streamed"


@dataclass(eq=False)
class _Unit:
    """A module's own tensors (not its children's), placed together."""

    module: nn.Module
    nbytes: int
    streamable: bool
    state: LayerState = LayerState.OFFLOADED
    home: dict[str, Tensor] = field(default_factory=dict)  # the resting tensors while copied
    hooks: list[RemovableHandle] = field(default_factory=list)


def _own_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    params = [(name, p.data) for name, p in module._parameters.items() if p is not None]
    return params + [(name, b) for name, b in module._buffers.items() if b is not None]


def _set_tensor(module: nn.Module, name: str, value: Tensor) -> None:
    param = module._parameters.get(name)
    if param is not None:
        param.data = value  # the Parameter object stays the same (patches hold it)
    else:
        module._buffers[name] = value


def _units(module: nn.Module) -> list[_Unit]:
    """Every submodule holding tensors of its own, in module order; leaves of the STREAMABLE
    types may be streamed."""
    units = []
    for part in module.modules():
        tensors = _own_tensors(part)
        if tensors:
            streamable = isinstance(part, STREAMABLE) and next(part.children(), None) is None
            units.append(_Unit(part, sum(t.numel() * t.element_size() for _, t in tensors),
                               streamable))
    return units


class Placement:
    """One top-level module's weights between the offload and the compute device."""

    def __init__(self, module: nn.Module, compute: torch.device, offload: torch.device,
                 name: str = "") -> None:
        self.module = module
        self.compute = compute
        self.offload_device = offload
        self.name = name or type(module).__name__
        self.units = _units(module)
        self.total_bytes = sum(unit.nbytes for unit in self.units)
        self.loaded = False
        self.held = 0  # > 0 while a block uses the weights: they must not move
        self.last_used = 0
        self.streamed_bytes = 0  # bytes copied in by streaming so far

    @property
    def bytes_on_compute(self) -> int:
        return sum(u.nbytes for u in self.units if u.state is LayerState.RESIDENT)

    @property
    def streamed_layers(self) -> int:
        return sum(u.state is LayerState.STREAMED for u in self.units)

    @property
    def streamed_copies(self) -> int:
        """Streamed layers whose copy is on the compute device now (0 between forwards)."""
        return sum(u.state is LayerState.STREAMED and bool(u.home) for u in self.units)

    def state_of(self, module: nn.Module) -> LayerState:
        for unit in self.units:
            if unit.module is module:
                return unit.state
        raise KeyError(f"{type(module).__name__} holds no weights of {self.name}")

    def describe(self) -> dict[str, Any]:
        state = ("offloaded" if not self.loaded else "partial" if self.streamed_layers
                 else "loaded")
        return {"name": self.name, "state": state, "bytes": self.total_bytes,
                "bytes_on_compute": self.bytes_on_compute,
                "streamed_layers": self.streamed_layers}

    def load(self, room: int | None) -> None:
        """Copy the weights to the compute device: all of them when `room` (bytes) is None or
        enough; else the tensors that cannot be streamed, then streamable layers in module
        order while they fit, and the rest are streamed per forward."""
        self.offload()
        fixed = sum(u.nbytes for u in self.units if not u.streamable)
        left = math.inf if room is None or room >= self.total_bytes else room - fixed
        for unit in sorted(self.units, key=lambda u: u.streamable):  # fixed ones first
            if not unit.streamable or unit.nbytes <= left:
                self._copy_in(unit)
                unit.state = LayerState.RESIDENT
                left -= unit.nbytes if unit.streamable else 0
            else:
                self._stream(unit)
        self.loaded = True
        if self.streamed_layers:
            logger.info("%s: %.1f of %.1f MB on %s, %d layers streamed from %s", self.name,
                        self.bytes_on_compute / 2**20, self.total_bytes / 2**20, self.compute,
                        self.streamed_layers, self.offload_device)

    def offload(self) -> None:
        """Drop every copy on the compute device; the weights are their resting tensors again."""
        for unit in self.units:
            for hook in unit.hooks:
                hook.remove()
            unit.hooks.clear()
            self._drop_copies(unit)
            unit.state = LayerState.OFFLOADED
        self.loaded = False

    # -- per unit ------------------------------------------------------------------------------
    def _copy_in(self, unit: _Unit) -> None:
        with torch.inference_mode(False), torch.no_grad():
            for name, tensor in _own_tensors(unit.module):
                unit.home[name] = tensor
                pinned = self.compute.type == "cuda" and tensor.is_pinned()
                _set_tensor(unit.module, name, tensor.to(self.compute, non_blocking=pinned))

    def _drop_copies(self, unit: _Unit) -> None:
        for name, tensor in unit.home.items():
            _set_tensor(unit.module, name, tensor)
        unit.home.clear()

    def _stream(self, unit: _Unit) -> None:
        """Copy the unit's tensors in before each forward of its module and drop them after
        (also when the forward raises)."""
        if self.compute.type == "cuda":
            self._pin(unit)

        def before(*_: Any) -> None:
            self._copy_in(unit)
            self.streamed_bytes += unit.nbytes

        def after(*_: Any) -> None:
            self._drop_copies(unit)

        # copied in before a held layer casts its weights up (memory/cast_on_use.py) and
        # dropped after it has put them back: the narrow weights travel, the cast is on device
        unit.hooks = [unit.module.register_forward_pre_hook(before, prepend=True),
                      unit.module.register_forward_hook(after, always_call=True)]
        unit.state = LayerState.STREAMED

    def _pin(self, unit: _Unit) -> None:
        """Page-lock the resting tensors so the per-forward copies run asynchronously."""
        for name, tensor in _own_tensors(unit.module):
            if tensor.device.type == "cpu" and not tensor.is_pinned():
                try:
                    _set_tensor(unit.module, name, tensor.pin_memory())
                except RuntimeError as exc:  # out of page-locked memory: copy synchronously
                    logger.warning("%s: could not pin %s (%s); streaming it unpinned",
                                   self.name, type(unit.module).__name__, exc)
                    return
