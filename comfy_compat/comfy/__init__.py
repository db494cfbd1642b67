"""ComfyUI's `comfy` package for custom-node packs: each submodule is a thin facade over Loom's
engine. ComfyUI imports most of them before packs load, so packs often write `import comfy` and
then use `comfy.sd...`; submodules load on first attribute access here for the same effect."""

from __future__ import annotations

import importlib
from types import ModuleType


def __getattr__(name: str) -> ModuleType:
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module 'comfy' has no attribute {name!r}: Loom's ComfyUI facade "
                             f"has no comfy.{name}") from None
