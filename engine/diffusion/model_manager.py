"""One loaded copy of each model file and dtype, shared by every node and prompt, kept within a
byte budget: least-recently-used models are evicted and reloaded transparently on next use.

Created once in main.py and handed down (ctx.models). How it works:
- `load(key, loader)` returns the shared object (a ModelHandle, a TextEncoderStack, a VAE ...)
  and registers the torch modules inside it, with their weight bytes.
- Eviction replaces a model's weights with meta tensors (the memory is released; objects that
  hold the model, e.g. cached node outputs, stay valid). Forward pre-hooks on the modules and
  the residency hook (called by engine.diffusion.patching.patched before weights are patched)
  reload the weights from the file on next use.
Not yet: a VRAM budget with offload to the CPU and partial (--lowvram) loading on CUDA."""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.diffusion.devices import DevicePolicy
from engine.diffusion.patching import RESIDENT_HOOK
from engine.diffusion.tokenizer import BpeCache

logger = logging.getLogger("loom.models")


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
    for attribute in ("unet", "module", "modules", "encoders"):
        inner = getattr(value, attribute, None)
        if isinstance(inner, dict):
            found.extend(m for m in inner.values() if isinstance(m, nn.Module))
        elif isinstance(inner, nn.Module):
            found.append(inner)
    return found


def module_bytes(module: nn.Module) -> int:
    tensors = itertools.chain(module.parameters(), module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type != "meta")


@dataclass(eq=False)
class Entry:
    """One loaded value and the bookkeeping the budget needs."""

    key: ModelKey
    value: Any
    loader: Callable[[], Any]
    modules: list[nn.Module]
    nbytes: int
    last_used: int = 0
    evicted: bool = False
    hooks: list[Any] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{Path(self.key.path).name}:{self.key.component}"


class ModelManager:
    """Loaded models by key, within `ram_budget` bytes (None: unbounded). Thread-safe."""

    def __init__(self, policy: DevicePolicy, bpe: BpeCache | None = None,
                 allow_pickle: bool = False, ram_budget: int | None = None) -> None:
        self.policy = policy
        self.bpe = bpe if bpe is not None else BpeCache()
        self.allow_pickle = allow_pickle
        self.ram_budget = ram_budget
        self._entries: dict[ModelKey, Entry] = {}
        self._clock = itertools.count(1)
        self._lock = threading.RLock()
        self.loads = 0
        self.reloads = 0

    # -- loading and use ---------------------------------------------------------------------
    def load(self, key: ModelKey, loader: Callable[[], Any]) -> Any:
        """The value for `key`, calling `loader` only the first time."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                value = loader()
                self.loads += 1
                modules = modules_of(value)
                entry = Entry(key, value, loader, modules, sum(map(module_bytes, modules)))
                self._entries[key] = entry
                self._install_hooks(entry)
            self._touch(entry)
            return entry.value

    def _install_hooks(self, entry: Entry) -> None:
        """Any forward through the model (or one of its top-level parts) marks it used and
        reloads it first if it was evicted."""
        def on_use(*_: Any) -> None:
            self._touch(entry)

        for module in entry.modules:
            for part in (module, *module.children()):
                entry.hooks.append(part.register_forward_pre_hook(on_use))
            setattr(module, RESIDENT_HOOK, on_use)

    def _touch(self, entry: Entry) -> None:
        with self._lock:
            entry.last_used = next(self._clock)
            if entry.evicted:
                self._reload(entry)
            self._evict_to_budget(keep=entry)

    def ensure_resident(self, value: Any) -> None:
        """Make sure `value`'s weights are loaded (before touching them without a forward)."""
        for module in modules_of(value):
            hook = getattr(module, RESIDENT_HOOK, None)
            if hook is not None:
                hook()

    # -- eviction ----------------------------------------------------------------------------
    def resident_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values() if not e.evicted)

    def _evict_to_budget(self, keep: Entry) -> None:
        if self.ram_budget is None:
            return
        candidates = sorted((e for e in self._entries.values() if not e.evicted and e is not keep),
                            key=lambda e: e.last_used)
        for entry in candidates:
            if self.resident_bytes() <= self.ram_budget:
                return
            self._evict(entry)

    def _evict(self, entry: Entry) -> None:
        """Release the weights: every parameter and buffer becomes a meta tensor."""
        for module in entry.modules:
            for part in module.modules():
                for name, param in list(part._parameters.items()):
                    if param is not None:
                        part._parameters[name] = nn.Parameter(
                            torch.empty_like(param, device="meta"), requires_grad=False)
                for name, buffer in list(part._buffers.items()):
                    if buffer is not None:
                        part._buffers[name] = torch.empty_like(buffer, device="meta")
        entry.evicted = True
        logger.info("evicted %s (%.1f MB) to stay within the model RAM budget", entry.name,
                    entry.nbytes / 2**20)

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
        """Forget every loaded model (POST /free); later uses load them again."""
        with self._lock:
            for entry in self._entries.values():
                for hook in entry.hooks:
                    hook.remove()
                for module in entry.modules:
                    if hasattr(module, RESIDENT_HOOK):
                        delattr(module, RESIDENT_HOOK)
            self._entries.clear()

    def stats(self) -> dict[str, Any]:
        """Figures for /system_stats and logs."""
        with self._lock:
            by_device: dict[str, int] = {}
            for entry in self._entries.values():
                if entry.evicted:
                    continue
                for module in entry.modules:
                    for tensor in itertools.chain(module.parameters(), module.buffers()):
                        device = tensor.device.type
                        by_device[device] = (by_device.get(device, 0)
                                             + tensor.numel() * tensor.element_size())
            return {"loaded": [e.name for e in self._entries.values() if not e.evicted],
                    "evicted": [e.name for e in self._entries.values() if e.evicted],
                    "bytes_by_device": by_device, "ram_budget": self.ram_budget,
                    "loads": self.loads, "reloads": self.reloads,
                    "policy": self.policy.describe()}

    def entries(self) -> Iterable[Entry]:
        return tuple(self._entries.values())
