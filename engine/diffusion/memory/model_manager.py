"""One loaded copy of each model file and dtype, shared by every node and prompt, kept within a
RAM budget and, on a GPU, a VRAM budget.

Created once in main.py and handed down (ctx.models). How it works:
- `load(key, loader)` returns the shared object (a ModelHandle, a TextEncoderStack, a VAE ...)
  and registers the torch modules inside it, with their weight bytes.
- Use is seen by forward pre-hooks on the modules and by the residency hook, which
  engine.diffusion.patches.patching.patched enters around patching and running a model.
- RAM: over the budget, the least recently used model is evicted: its weights become meta
  tensors (the memory is released; objects that hold the model, e.g. cached node outputs, stay
  valid) and are reloaded from the file on next use.
- VRAM (engine/diffusion/memory/offload.py): weights rest on the offload device (CPU) and each
  top-level module (UNet, text encoder, VAE ...) is copied to the compute device when used,
  after offloading the least recently used others until it fits the budget; a module that
  does not fit even then is loaded partially, its remaining layers streamed per forward."""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.diffusion.memory.devices import DevicePolicy
from engine.diffusion.memory.offload import (
    COMPUTE_DEVICE,
    MemoryInfo,
    Placement,
    VramSettings,
    cuda_memory_probe,
)
from engine.diffusion.memory.page_release import PageReleaser

logger = logging.getLogger("loom.models")
# Attribute the manager sets on the modules it manages: calling it gives a context manager that
# loads the weights (from the file if evicted, onto the compute device if offloaded) and keeps
# them loaded and unmoved for the block (engine.diffusion.patches.patching.patched enters it).
RESIDENT_HOOK = "_loom_ensure_resident"
# Class attribute saying what a module is to the device policy ("vae": --cpu-vae applies).
COMPUTE_ROLE = "compute_role"


@dataclass(frozen=True)
class ModelKey:
    """Identity of a loaded component: the file's path, size and mtime (an edited file is a
    new model), which part of it, and how it was loaded."""

    path: str
    size: int
    mtime_ns: int
    component: str
    options: tuple[Any, ...] = ()

    @classmethod
    def for_file(cls, path: Path, component: str, *options: Any) -> ModelKey:
        stat = path.stat()
        return cls(str(path.resolve()), stat.st_size, stat.st_mtime_ns, component, options)


def modules_of(value: Any) -> list[nn.Module]:
    """The torch modules inside a loaded value (a module, a handle, a tuple of handles ...)."""
    if isinstance(value, nn.Module):
        return [value]
    if isinstance(value, (tuple, list)):
        return [m for item in value for m in modules_of(item)]
    found = []
    for attribute in ("unet", "module", "modules", "encoders", "network"):
        inner = getattr(value, attribute, None)
        if isinstance(inner, Mapping):
            found.extend(m for m in inner.values() if isinstance(m, nn.Module))
        elif isinstance(inner, nn.Module):
            found.append(inner)
    return found


def module_bytes(module: nn.Module, device_type: str | None = None) -> int:
    """Bytes of the module's weights (only those on devices of `device_type` when given)."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type != "meta"
               and (device_type is None or t.device.type == device_type))


def deriving_parts(modules: Iterable[nn.Module]) -> list[Any]:
    """The parts of `modules` that hold copies derived from their weights (packed conv
    weights), which report those copies' bytes with `derived_bytes()`."""
    return [part for module in modules for part in module.modules()
            if hasattr(part, "derived_bytes")]


def _entry_name(key: ModelKey) -> str:
    return f"{Path(key.path).name}:{key.component}"


@dataclass(eq=False)
class Entry:
    """One loaded value and the bookkeeping the budgets need: one Placement per module."""

    key: ModelKey
    value: Any
    loader: Callable[[], Any]
    modules: list[nn.Module]
    placements: list[Placement]
    nbytes: int  # weights in RAM, what the RAM budget counts with the derived copies
    deriving: list[Any] = field(default_factory=list)  # parts holding derived copies
    last_used: int = 0
    evicted: bool = False

    @property
    def name(self) -> str:
        return _entry_name(self.key)

    @property
    def resident_bytes(self) -> int:
        return 0 if self.evicted else self.nbytes + sum(p.derived_bytes() for p in self.deriving)

    @property
    def held(self) -> bool:
        return any(placement.held for placement in self.placements)


class ModelManager:
    """Loaded models by key, within `ram_budget` bytes of RAM (None: unbounded) and, when
    `vram` is set, its VRAM budget; by default `vram` is set whenever the policy's weights
    rest off the compute device (CUDA without --gpu-only). Thread-safe."""

    def __init__(self, policy: DevicePolicy, allow_pickle: bool = False,
                 ram_budget: int | None = None, vram: VramSettings | None = None) -> None:
        self.policy = policy
        self.allow_pickle = allow_pickle
        self.ram_budget = ram_budget
        if vram is None and policy.offload_device != policy.device:
            vram = VramSettings(cuda_memory_probe(policy.device))
        self.vram = vram
        self._entries: dict[ModelKey, Entry] = {}
        self._pages = PageReleaser()
        self._node_parts: set[Placement] = set()  # the modules the running node has used
        self._clock = itertools.count(1)
        self._lock = threading.RLock()
        self.loads = 0
        self.reloads = 0

    # -- loading and use ---------------------------------------------------------------------
    def load(self, key: ModelKey, loader: Callable[[], Any],
             size: Callable[[], int] | None = None) -> Any:
        """The value for `key`, calling `loader` only the first time. `size` gives the bytes
        the loaded weights will take (read from the file's header): under a RAM budget the
        least recently used models are evicted to make room before `loader` runs, so RAM
        holds at most the budget while a model loads, not the budget plus the new model."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                if size is not None and self.ram_budget is not None:
                    self._make_room(size())
                value = loader()
                self.loads += 1
                modules = modules_of(value)
                placements = [Placement(module, self.compute_device_for(module),
                                        self.policy.offload_device,
                                        f"{_entry_name(key)}/{type(module).__name__}")
                              for module in modules]
                entry = Entry(key, value, loader, modules, placements,
                              sum(module_bytes(module, "cpu") for module in modules),
                              deriving_parts(modules))
                self._entries[key] = entry
                for module, placement in zip(modules, placements, strict=True):
                    self._install_hooks(entry, module, placement)
            self._touch(entry)
            return entry.value

    def compute_device_for(self, module: nn.Module) -> torch.device:
        """The policy's device; its VAE device for modules whose class says
        `compute_role = "vae"` (--cpu-vae keeps those on the CPU); the CPU for modules marked
        `compute_role = "cpu"` (CLIPLoader's device option)."""
        role = getattr(module, COMPUTE_ROLE, None)
        if role == "vae":
            return self.policy.vae_compute_device
        return torch.device("cpu") if role == "cpu" else self.policy.device

    def _install_hooks(self, entry: Entry, module: nn.Module, placement: Placement) -> None:
        """Any forward through the module (or one of its top-level parts) marks it used and
        loads it first; patching.patched holds it loaded through the residency hook."""
        def on_use(*_: Any) -> None:
            self._touch(entry, placement)

        # Prepended: a reload replaces the parameters, so the module's other pre-hooks (a held
        # layer's cast-up, streaming) must run after it, on the reloaded ones.
        for part in (module, *module.children()):
            part.register_forward_pre_hook(on_use, prepend=True)
        setattr(module, RESIDENT_HOOK, lambda: self._hold(entry, placement))
        setattr(module, COMPUTE_DEVICE, placement.compute)

    def _touch(self, entry: Entry, placement: Placement | None = None) -> None:
        with self._lock:
            entry.last_used = next(self._clock)
            if entry.evicted:
                if self.ram_budget is not None:
                    self._make_room(entry.nbytes)
                self._reload(entry)
            if (placement is not None and self.vram is not None
                    and placement.compute == self.policy.device):  # not a --cpu-vae module
                placement.last_used = entry.last_used
                if not placement.loaded:
                    self._load_to_compute(placement, self.vram)
            self._evict_to_budget(keep=entry)
            self._mark_used(entry.placements if placement is None else (placement,))

    # -- one node's models resident ------------------------------------------------------------
    def begin_node(self) -> None:
        """A node starts (the executor calls this). The first use of each module in it lets
        the file pages of every module the node has not used go (memory/page_release.py):
        the UNet's pages leave while the VAE decodes, the text encoders' while the UNet
        samples, and come back from the page cache when next used."""
        with self._lock:
            self._node_parts = set()

    def _mark_used(self, placements: Iterable[Placement]) -> None:
        fresh = [p for p in placements if p not in self._node_parts]
        if fresh:
            self._node_parts.update(fresh)
            self._release_pages()

    def _release_pages(self) -> None:
        idle = [placement for entry in self._entries.values() if not entry.evicted
                for placement in entry.placements
                if placement not in self._node_parts and not placement.held]
        released = self._pages.release(placement.module for placement in idle)
        if released:
            logger.debug("let %.0f MB of file pages go: %s", released / 2**20,
                         ", ".join(placement.name for placement in idle))

    @contextmanager
    def _hold(self, entry: Entry, placement: Placement) -> Iterator[None]:
        """Load the module's weights and keep them loaded, unmoved, for the block."""
        with self._lock:
            self._touch(entry, placement)
            placement.held += 1
        try:
            yield
        finally:
            with self._lock:
                placement.held -= 1

    def ensure_resident(self, value: Any) -> None:
        """Make sure `value`'s weights are loaded (before touching them without a forward)."""
        for module in modules_of(value):
            hold = getattr(module, RESIDENT_HOOK, None)
            if hold is not None:
                with hold():
                    pass

    # -- VRAM ----------------------------------------------------------------------------------
    def _placements(self) -> Iterator[Placement]:
        return (p for entry in self._entries.values() for p in entry.placements)

    def _load_to_compute(self, placement: Placement, vram: VramSettings) -> None:
        """Offload the least recently used other modules until `placement` fits the VRAM budget
        (every other one without smart memory), then load it; partially if it still does not
        fit. Modules held by a running block are never offloaded."""
        if vram.mode.keeps_models:
            placement.load(None)
            return
        budget = vram.budget()
        others = sorted((p for p in self._placements() if p.loaded and p is not placement),
                        key=lambda p: p.last_used)
        used = sum(p.bytes_on_compute for p in others)
        for other in others:
            if vram.smart_memory and used + placement.total_bytes <= budget:
                break
            if not other.held:
                used -= other.bytes_on_compute
                other.offload()
                logger.info("offloaded %s to %s to make room for %s", other.name,
                            other.offload_device, placement.name)
        placement.load(budget - used)

    def memory_info(self) -> MemoryInfo | None:
        """Total and free memory of the compute device, when its memory is managed."""
        return None if self.vram is None else self.vram.probe()

    # -- eviction ----------------------------------------------------------------------------
    def resident_bytes(self) -> int:
        """Bytes of the loaded models' weights in RAM, with the copies derived from them
        (packed conv weights, memory/packed_conv.py) counted."""
        return sum(entry.resident_bytes for entry in self._entries.values())

    def _evict_to_budget(self, keep: Entry) -> None:
        if self.ram_budget is not None:
            self._evict_until(self.ram_budget, keep, "to stay within the model RAM budget")

    def _make_room(self, incoming: int) -> None:
        """Evict before a load so that the loaded models plus `incoming` bytes fit the budget
        (as far as models not in use can be evicted)."""
        assert self.ram_budget is not None
        self._evict_until(self.ram_budget - incoming, None,
                          f"to make room for a {incoming / 2**20:.1f} MB model")

    def _evict_until(self, limit: int, keep: Entry | None, why: str) -> None:
        candidates = sorted((e for e in self._entries.values()
                             if not e.evicted and not e.held and e is not keep),
                            key=lambda e: e.last_used)
        for entry in candidates:
            if self.resident_bytes() <= limit:
                return
            self._evict(entry, why)

    def _evict(self, entry: Entry, why: str) -> None:
        """Release the weights: copies leave the compute device, every parameter and buffer
        becomes a meta tensor, and copies derived from them (packed conv weights) are dropped."""
        for placement in entry.placements:
            placement.offload()
        for module in entry.modules:
            for part in module.modules():
                drop_packed = getattr(part, "drop_packed", None)
                if drop_packed is not None:
                    drop_packed()
                for name, param in list(part._parameters.items()):
                    if param is not None:
                        part._parameters[name] = nn.Parameter(
                            torch.empty_like(param, device="meta"), requires_grad=False)
                for name, buffer in list(part._buffers.items()):
                    if buffer is not None:
                        part._buffers[name] = torch.empty_like(buffer, device="meta")
        entry.evicted = True
        logger.info("evicted %s (%.1f MB) %s", entry.name, entry.nbytes / 2**20, why)

    def _reload(self, entry: Entry) -> None:
        """Load the weights again from the file and put them into the same modules."""
        fresh = modules_of(entry.loader())
        if len(fresh) != len(entry.modules):
            raise RuntimeError(f"reloading {entry.name} gave {len(fresh)} modules, expected "
                               f"{len(entry.modules)}; the file changed in place?")
        for module, new in zip(entry.modules, fresh, strict=True):
            module.load_state_dict(new.state_dict(), assign=True)
        entry.evicted = False
        self.reloads += 1
        logger.info("reloaded %s", entry.name)

    # -- housekeeping --------------------------------------------------------------------------
    def free(self) -> None:
        """Unload every model not in use (POST /free): its weights leave the compute device and
        RAM; objects that hold it stay valid and load it again on next use."""
        with self._lock:
            for entry in self._entries.values():
                if not entry.evicted and not entry.held:
                    self._evict(entry, "to free memory")
        if self.policy.device.type == "cuda":
            torch.cuda.empty_cache()

    def stats(self) -> dict[str, Any]:
        """Figures for /system_stats and logs."""
        with self._lock:
            live = [e for e in self._entries.values() if not e.evicted]
            by_device: dict[str, int] = {}
            for placement in (p for entry in live for p in entry.placements):
                on_compute = placement.bytes_on_compute
                for device, count in ((placement.offload_device, placement.total_bytes),
                                      (placement.compute, on_compute)):
                    by_device[device.type] = by_device.get(device.type, 0) + count
                    if placement.compute == placement.offload_device:
                        break  # one copy: the weights are already where they compute
            return {"loaded": [e.name for e in live],
                    "evicted": [e.name for e in self._entries.values() if e.evicted],
                    "bytes_by_device": by_device, "ram_budget": self.ram_budget,
                    "vram": self._vram_stats(live), "loads": self.loads,
                    "reloads": self.reloads, "policy": self.policy.describe()}

    def _vram_stats(self, live: list[Entry]) -> dict[str, Any] | None:
        if self.vram is None:
            return None
        info = self.vram.probe()
        placements = [p for entry in live for p in entry.placements]
        return {"mode": self.vram.mode.value, "total": info.total, "free": info.free,
                "reserve": self.vram.reserve, "budget": self.vram.budget(),
                "used": sum(p.bytes_on_compute for p in placements),
                "smart_memory": self.vram.smart_memory,
                "models": [p.describe() for p in placements]}

    def entries(self) -> Iterable[Entry]:
        return tuple(self._entries.values())
