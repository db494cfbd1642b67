"""Loads custom-node packs (ComfyUI's classic protocol, or Loom-native Node subclasses) from the
custom_nodes folders, keeping each pack's failure to itself: a broken pack is reported, the others
still load."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib.util
import inspect
import logging
import re
import sys
import time
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from engine import comfy_host
from engine.classic import adapt_classic
from engine.node import Node
from engine.registry import NodeRegistry, PackError

logger = logging.getLogger("loom.custom_nodes")

DISABLED_SUFFIX = ".disabled"
# ComfyUI's module names (folder_paths, comfy.*, server, node_helpers ...) as facades over Loom.
COMFY_API_ROOT = Path(__file__).resolve().parent.parent / "comfy_compat"
# ComfyUI's top-level module names; a missing one is a gap in Loom's facade, not a pip package.
COMFY_MODULE_ROOTS = frozenset({"comfy", "comfy_extras", "comfy_api", "comfy_execution",
                                "folder_paths", "server", "nodes", "node_helpers",
                                "latent_preview", "execution", "app", "utils", "comfyui_version",
                                "cuda_malloc", "new_updater", "protocol", "comfy_config"})
COMFY_SUPPORT = "loom_support"  # installs the MODEL/CLIP/VAE bridge and the internals importer


class PackLoadError(ImportError):
    """A pack imported but does not follow the protocol (e.g. NODE_CLASS_MAPPINGS not a dict)."""


@dataclass(frozen=True)
class PackSource:
    """One pack found in a custom_nodes folder: a `.py` file or a package directory."""

    name: str  # folder name, or file name without .py
    entry: str  # the folder entry itself ("pack" or "pack.py"), as --whitelist-custom-nodes names
    path: Path
    is_package: bool

    @property
    def init_file(self) -> Path:
        return self.path / "__init__.py" if self.is_package else self.path

    @property
    def directory(self) -> Path:
        """Where WEB_DIRECTORY is resolved from."""
        return self.path if self.is_package else self.path.parent


def discover_packs(folder: Path) -> list[PackSource]:
    """The packs in one folder, by name; skips hidden, `__pycache__` and `.disabled` entries."""
    if not folder.is_dir():
        logger.debug("custom node folder %s does not exist; nothing to load", folder)
        return []
    packs = []
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith(".") or name == "__pycache__" or name.endswith(DISABLED_SUFFIX):
            continue
        if path.is_file() and path.suffix == ".py":
            packs.append(PackSource(path.stem, name, path, is_package=False))
        elif path.is_dir() and (path / "__init__.py").is_file():
            packs.append(PackSource(name, name, path, is_package=True))
        elif path.is_dir():
            logger.warning("skipping %s: a pack directory needs an __init__.py", path)
    return packs


def install_comfy_api() -> None:
    """Put ComfyUI's module names first on the import path, as ComfyUI's root is when packs
    load, and let pack nodes receive MODEL/CLIP/VAE as ComfyUI's objects. Idempotent."""
    root = str(COMFY_API_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)
    if comfy_host.HOST.values is None:
        importlib.import_module(COMFY_SUPPORT).install(comfy_host.HOST)


def load_custom_nodes(registry: NodeRegistry, folders: list[Path], *, disable_all: bool = False,
                      whitelist: Iterable[str] = ()) -> None:
    """Import every pack of `folders` and register its nodes. With `disable_all` only the
    `whitelist` packs load (ComfyUI's --disable-all-custom-nodes, --whitelist-custom-nodes)."""
    install_comfy_api()
    allowed = frozenset(whitelist)
    timings: list[tuple[float, Path, bool]] = []
    for folder in folders:
        for pack in discover_packs(folder):
            if disable_all and not allowed & {pack.name, pack.entry}:
                logger.info("skipping %s: custom nodes are disabled and it is not whitelisted",
                            pack.path)
                continue
            started = time.perf_counter()
            loaded = load_pack(registry, pack)
            timings.append((time.perf_counter() - started, pack.path, loaded))
    _log_import_times(timings)


def load_pack(registry: NodeRegistry, pack: PackSource) -> bool:
    """Import one pack and register its nodes; a failure goes to registry.pack_errors."""
    try:
        module = import_pack(pack)
        mappings, display_names = _mappings(module)
    except Exception as exc:  # noqa: BLE001 - a broken pack is reported, never fatal to others
        _record_error(registry, pack, traceback.format_exc(), import_hint(pack, exc))
        return False
    _record_web_directory(registry, pack, module)
    mappings = {**mappings, **_entrypoint_nodes(registry, pack, module)}
    taken = [name for name in mappings if name in registry]
    for class_type, cls in mappings.items():
        if class_type not in taken:
            _register_node(registry, pack, class_type, cls, display_names.get(class_type))
    if taken:
        logger.warning("custom node pack %s: skipped %s, already registered (the first "
                       "registration wins)", pack.name, ", ".join(map(str, taken)))
    registry.loaded_packs.append(pack.name)
    return True


def import_pack(pack: PackSource) -> ModuleType:
    """Execute a pack's module under a name unique to its path, so relative imports work and
    same-named packs in two folders do not clash."""
    module_name = _module_name(pack)
    search = [str(pack.path)] if pack.is_package else None
    spec = importlib.util.spec_from_file_location(module_name, pack.init_file,
                                                  submodule_search_locations=search)
    if spec is None or spec.loader is None:
        raise ImportError(f"Python found no loader for {pack.init_file}; a pack must be a .py "
                          f"file or a directory with __init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before exec: relative imports look the package up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def _module_name(pack: PackSource) -> str:
    digest = hashlib.blake2b(str(pack.path.resolve()).encode("utf-8", "surrogatepass"),
                             digest_size=4).hexdigest()
    safe = re.sub(r"\W", "_", pack.name)
    return f"loom_custom_nodes_{digest}_{safe}"


def _mappings(module: ModuleType) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS, checked to be dicts."""
    classes = getattr(module, "NODE_CLASS_MAPPINGS", None)
    names = getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None)
    if classes is None:
        if getattr(module, "WEB_DIRECTORY", None) is None and \
                not callable(getattr(module, "comfy_entrypoint", None)):
            logger.warning("%s defines no NODE_CLASS_MAPPINGS; it adds no nodes", module.__file__)
        classes = {}
    for label, value in (("NODE_CLASS_MAPPINGS", classes), ("NODE_DISPLAY_NAME_MAPPINGS", names)):
        if value is not None and not isinstance(value, Mapping):
            raise PackLoadError(f"{module.__file__}: {label} is {type(value).__name__}; it must "
                                f"be a dict of class_type: value")
    return classes, names or {}


def _entrypoint_nodes(registry: NodeRegistry, pack: PackSource, module: ModuleType
                      ) -> dict[str, Any]:
    """The V3 node classes of a pack's `comfy_entrypoint()` extension, by node id."""
    entrypoint = getattr(module, "comfy_entrypoint", None)
    if not callable(entrypoint):
        return {}
    try:
        extension = _await(entrypoint())
        _await(extension.on_load())
        classes = _await(extension.get_node_list())
        return {cls.__loom_node__().schema.name: cls for cls in classes}
    except Exception as exc:  # noqa: BLE001 - a broken extension is reported like an import
        _record_error(registry, pack, traceback.format_exc(), import_hint(pack, exc))
        return {}


def _await(value: Any) -> Any:
    """ComfyUI's extension hooks may be coroutines; run one to its result."""
    return asyncio.run(value) if inspect.iscoroutine(value) else value


def _register_node(registry: NodeRegistry, pack: PackSource, class_type: Any, cls: Any,
                   display_name: Any) -> None:
    """Adapt and register one node; a bad declaration is a pack error, the others still load."""
    try:
        if not isinstance(class_type, str) or not class_type:
            raise PackLoadError(f"NODE_CLASS_MAPPINGS key {class_type!r} is not a node name; "
                                f"use a non-empty string")
        if isinstance(cls, type) and issubclass(cls, Node):
            registry.register(_native_node(class_type, cls))
            return
        if isinstance(cls, type) and hasattr(cls, "__loom_node__"):  # V3 (comfy_api.latest)
            registry.register(_renamed(cls.__loom_node__(), class_type, pack))
            return
        shown = str(display_name) if display_name is not None else None
        node_type = adapt_classic(class_type, cls, shown, f"custom_nodes.{pack.name}")
        registry.register(node_type)
    except Exception as exc:  # noqa: BLE001 - one bad node class must not sink its whole pack
        _record_error(registry, pack, traceback.format_exc(),
                      f"node {class_type!r} of {pack.name} was not registered: "
                      f"{type(exc).__name__}: {exc}")


def _renamed(node_type: type[Node], class_type: str, pack: PackSource) -> type[Node]:
    """A V3 node registered under its NODE_CLASS_MAPPINGS key (ComfyUI uses the key), as a
    node of its pack."""
    schema = dataclasses.replace(node_type.schema, name=class_type,
                                 python_module=f"custom_nodes.{pack.name}")
    return type(node_type.__name__, (node_type,), {"schema": schema,
                                                    "__module__": node_type.__module__})


def _native_node(class_type: str, cls: type[Node]) -> type[Node]:
    """A Loom-native Node subclass, registered as declared once its name is checked."""
    schema = getattr(cls, "schema", None)
    name = getattr(schema, "name", None)
    if name != class_type:
        raise PackLoadError(f"NODE_CLASS_MAPPINGS maps {class_type!r} to the Loom node "
                            f"{cls.__qualname__}, whose schema name is {name!r}; use the same "
                            f"name for both")
    return cls


def import_hint(pack: PackSource, exc: BaseException) -> str:
    """One line saying what the pack lacks and how to get it (a missing package's pip
    requirement, or the ComfyUI name Loom does not provide)."""
    missing = _missing_module(exc)
    requirements = pack.directory / "requirements.txt"
    install = (f"pip install -r {requirements}" if pack.is_package and requirements.is_file()
               else f"pip install {missing}")
    if missing is not None and missing.split(".")[0] in COMFY_MODULE_ROOTS:
        return (f"custom node pack {pack.name} needs ComfyUI's module {missing!r}, which Loom "
                f"does not provide; the pack cannot load in Loom")
    if missing is not None:
        return (f"custom node pack {pack.name} needs the Python package {missing!r}, which is "
                f"not installed; install the pack's requirements: {install}")
    if isinstance(exc, ImportError) and exc.name is not None:
        return (f"custom node pack {pack.name}: {exc} (module {exc.name!r} lacks a name the pack "
                f"imports)")
    return f"custom node pack {pack.name} failed to import: {type(exc).__name__}: {exc}"


def _missing_module(exc: BaseException) -> str | None:
    """The top-level name of a module that could not be found, from the error's chain."""
    while exc is not None:
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            return exc.name
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def _record_error(registry: NodeRegistry, pack: PackSource, trace: str,
                  summary: str = "") -> None:
    registry.pack_errors.append(PackError(pack.name, pack.path, trace, summary))
    logger.error("Cannot import custom node pack %s: %s\n%s", pack.path, summary, trace)


def _record_web_directory(registry: NodeRegistry, pack: PackSource, module: ModuleType) -> None:
    """WEB_DIRECTORY, relative to the pack, becomes the pack's served extension folder."""
    relative = getattr(module, "WEB_DIRECTORY", None)
    if relative is None:
        return
    directory = (pack.directory / str(relative)).resolve()
    if not directory.is_dir():
        logger.warning("custom node pack %s: WEB_DIRECTORY %r is not a folder (%s); its web "
                       "extensions are not served", pack.name, relative, directory)
        return
    if pack.name in registry.web_directories:
        logger.warning("custom node pack %s: a pack of that name already serves %s; %s is not "
                       "served", pack.name, registry.web_directories[pack.name], directory)
        return
    registry.web_directories[pack.name] = directory


def _log_import_times(timings: list[tuple[float, Path, bool]]) -> None:
    """ComfyUI's start-up summary, slowest pack first."""
    if not timings:
        return
    lines = ["Import times for custom nodes:"]
    for seconds, path, loaded in sorted(timings, key=lambda item: item[0], reverse=True):
        status = "" if loaded else " (IMPORT FAILED)"
        lines.append(f"{seconds:6.1f} seconds{status}: {path}")
    logger.info("\n".join(lines))
