"""One loaded copy of each model file and dtype, shared by every node and prompt.

Created once in main.py and handed down (ctx.models). Issue 6 grows this into a byte-budgeted
manager with offloading; the interface nodes use (`load`, `free`, `stats`) stays."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.diffusion.devices import DevicePolicy
from engine.diffusion.tokenizer import BpeCache


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


class ModelManager:
    """Loaded models by key. Thread-safe: the server's worker and requests may both ask."""

    def __init__(self, policy: DevicePolicy, bpe: BpeCache | None = None,
                 allow_pickle: bool = False) -> None:
        self.policy = policy
        self.bpe = bpe if bpe is not None else BpeCache()
        self.allow_pickle = allow_pickle
        self._loaded: OrderedDict[ModelKey, Any] = OrderedDict()
        self._lock = threading.RLock()

    def load(self, key: ModelKey, loader: Callable[[], Any]) -> Any:
        """The component for `key`, calling `loader` only the first time."""
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            value = loader()
            self._loaded[key] = value
            return value

    def free(self) -> None:
        """Forget every loaded model (the server's POST /free)."""
        with self._lock:
            self._loaded.clear()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"loaded": [f"{Path(k.path).name}:{k.component}" for k in self._loaded],
                    "policy": self.policy.describe()}
