"""ComfyUI internals Loom does not reproduce (its model classes under comfy.ldm, comfy.cldm,
comfy.hooks, ...), importable so a pack that merely imports or subclasses them still loads.

Every name in such a module is a stand-in that raises NotImplementedError naming itself when
called or instantiated (subclassing works, so `class MyBlock(BasicTransformerBlock)` at import
time does not fail). Modules Loom does implement are real files beside this one and raise
AttributeError for names they lack, so feature checks on them stay truthful."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

INTERNAL_ROOTS = ("comfy.", "comfy_extras.", "comfy_api.", "comfy_execution.", "app.",
                  "comfy_config.")


class Unavailable(type):
    """Metaclass of the stand-ins: calling one raises; attributes are stand-ins too."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return unavailable(f"{cls.__module__}.{cls.__qualname__}.{name}")

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{cls.loom_name} is part of ComfyUI that Loom does not provide (Loom has its own "
            f"model stack and node engine); what uses it cannot run in Loom")


def unavailable(qualified_name: str) -> type:
    """A stand-in for ComfyUI's `qualified_name`, raising when used."""
    module, _, name = qualified_name.rpartition(".")
    return Unavailable(name, (), {"__module__": module, "__qualname__": name,
                                  "loom_name": qualified_name})


def node_module_attribute(module: str, name: str) -> Any:
    """`module.name` for a ComfyUI module that defines built-in nodes (comfy_extras.nodes_*):
    the Loom node of that name as a classic class once registered, else a stand-in."""
    if name.startswith("__"):
        raise AttributeError(name)
    import comfy_nodes
    if name in comfy_nodes.node_modules().get(module, ()) and comfy_nodes.is_registered(name):
        return comfy_nodes.classic_class(name)
    return unavailable(f"{module}.{name}")


class InternalsModule(ModuleType):
    """A ComfyUI module Loom does not implement: Loom's nodes ComfyUI defines there (see
    node_module_attribute), every other attribute a stand-in."""

    def __getattr__(self, name: str) -> Any:
        return node_module_attribute(self.__name__, name)


class InternalsFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Consulted after the real files: serves ComfyUI module paths Loom has no file for."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if not fullname.startswith(INTERNAL_ROOTS):
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = InternalsModule(spec.name, f"ComfyUI's {spec.name}, not provided by Loom.")
        module.__path__ = []
        return module

    def exec_module(self, module: ModuleType) -> None:
        return None


def install_finder() -> None:
    """Add the finder once, after the path-based finders (real facade files win)."""
    if not any(isinstance(finder, InternalsFinder) for finder in sys.meta_path):
        sys.meta_path.append(InternalsFinder())
