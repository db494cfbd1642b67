"""ComfyUI's `folder_paths` module for custom-node packs, over the process's `engine.paths.Paths`.

Module attributes packs read (`models_dir`, `output_directory`, `folder_names_and_paths` ...)
are computed from the bound Paths on every access, and `folder_names_and_paths` writes through,
so a pack that registers its own model folder at import time is seen by Loom's loaders too."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, MutableMapping, MutableSequence
from pathlib import Path
from typing import Any

from engine.comfy_host import HOST
from engine.paths import MODEL_EXTENSIONS, PathError, Paths, canonical_folder
from nodes.filenames import prepare_save, split_annotation

supported_pt_extensions: set[str] = set(MODEL_EXTENSIONS)
SPECIAL_DIRECTORIES = ("input", "output", "temp")
CUSTOM_NODES = "custom_nodes"  # ComfyUI lists the custom-node folders in the same table


def _paths() -> Paths:
    return HOST.require_services("folder_paths").paths


class _DirList(MutableSequence):
    """One kind's search folders as ComfyUI's list of path strings, editing Paths in place."""

    def __init__(self, dirs: list[Path]) -> None:
        self._dirs = dirs

    def __getitem__(self, index: Any) -> Any:
        item = self._dirs[index]
        return [str(p) for p in item] if isinstance(index, slice) else str(item)

    def __setitem__(self, index: Any, value: Any) -> None:
        self._dirs[index] = ([Path(v) for v in value] if isinstance(index, slice)
                             else Path(value))

    def __delitem__(self, index: Any) -> None:
        del self._dirs[index]

    def __len__(self) -> int:
        return len(self._dirs)

    def insert(self, index: int, value: Any) -> None:
        self._dirs.insert(index, Path(value))

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, (list, _DirList)) else False

    def __repr__(self) -> str:
        return repr(list(self))


class _FolderTable(MutableMapping):
    """`folder_names_and_paths`: kind -> (folder list, extension set), live over Paths."""

    def __getitem__(self, kind: str) -> tuple[_DirList, set[str]]:
        paths = _paths()
        if kind == CUSTOM_NODES:
            return _DirList(paths.custom_nodes), set()
        name = canonical_folder(kind)
        if name not in paths.models:
            raise KeyError(kind)
        return _DirList(paths.models[name]), _ExtensionSet(paths, name)

    def __setitem__(self, kind: str, value: Any) -> None:
        folders, extensions = value
        paths = _paths()
        name = canonical_folder(kind)
        paths.models[name] = [Path(f) for f in folders]
        paths.extensions[name] = frozenset(extensions or ()) or frozenset({""})

    def __delitem__(self, kind: str) -> None:
        paths = _paths()
        del paths.models[canonical_folder(kind)]

    def __iter__(self) -> Iterator[str]:
        return iter([*_paths().models, CUSTOM_NODES])

    def __len__(self) -> int:
        return len(_paths().models) + 1


class _ExtensionSet(set):
    """A kind's extensions; `add`/`update` by a pack reach the Paths table."""

    def __init__(self, paths: Paths, kind: str) -> None:
        super().__init__(paths.extensions.get(kind, frozenset()))
        self._paths, self._kind = paths, kind

    def add(self, value: str) -> None:
        super().add(value)
        self._paths.extensions[self._kind] = frozenset(self)

    def update(self, *values: Any) -> None:
        super().update(*values)
        self._paths.extensions[self._kind] = frozenset(self)


folder_names_and_paths: MutableMapping[str, Any] = _FolderTable()


def __getattr__(name: str) -> Any:
    """The folder attributes ComfyUI keeps as module globals, read from the bound Paths."""
    readers = {"base_path": lambda p: p.base, "models_dir": lambda p: p.base / "models",
               "output_directory": lambda p: p.output, "temp_directory": lambda p: p.temp,
               "input_directory": lambda p: p.input, "user_directory": lambda p: p.user}
    if name in readers:
        return str(readers[name](_paths()))
    if name == "filename_list_cache":
        return {}
    raise AttributeError(f"module 'folder_paths' has no attribute {name!r} in Loom's facade")


def map_legacy(folder_name: str) -> str:
    return canonical_folder(folder_name)


def get_output_directory() -> str:
    return str(_paths().output)


def get_temp_directory() -> str:
    return str(_paths().temp)


def get_input_directory() -> str:
    return str(_paths().input)


def get_user_directory() -> str:
    return str(_paths().user)


def set_output_directory(output_dir: str) -> None:
    _paths().output = Path(output_dir).resolve()


def set_temp_directory(temp_dir: str) -> None:
    _paths().temp = Path(temp_dir).resolve()


def set_input_directory(input_dir: str) -> None:
    _paths().input = Path(input_dir).resolve()


def get_directory_by_type(type_name: str) -> str | None:
    """"output", "temp" or "input" -> its folder; anything else -> None (as ComfyUI)."""
    if type_name not in SPECIAL_DIRECTORIES:
        return None
    return str(_paths().folder_dirs(type_name)[0])


def annotated_filepath(name: str) -> tuple[str, str | None]:
    """("a.png", output dir) for "a.png [output]"; (name, None) when not annotated."""
    folder, bare = split_annotation(name, default="")
    return bare, (get_directory_by_type(folder) if folder else None)


def get_annotated_filepath(name: str, default_dir: str | None = None) -> str:
    bare, base = annotated_filepath(name)
    return os.path.join(base or default_dir or get_input_directory(), bare)


def exists_annotated_filepath(name: str) -> bool:
    return os.path.exists(get_annotated_filepath(name))


def add_model_folder_path(folder_name: str, full_folder_path: str,
                          is_default: bool = False) -> None:
    _paths().add_model_dir(folder_name, Path(full_folder_path), first=is_default)


def get_folder_paths(folder_name: str) -> list[str]:
    if folder_name == CUSTOM_NODES:
        return [str(p) for p in _paths().custom_nodes]
    try:
        return [str(p) for p in _paths().folder_dirs(folder_name)]
    except PathError:
        raise KeyError(folder_name) from None


def get_filename_list(folder_name: str) -> list[str]:
    """Files of a folder kind, relative '/'-separated names, sorted; [] for an unknown kind."""
    try:
        return _paths().list_files(folder_name)
    except PathError:
        return []


def get_full_path(folder_name: str, filename: str) -> str | None:
    """Absolute path of `filename` in a folder kind; None when it is not there."""
    try:
        return str(_paths().find_file(folder_name, filename))
    except PathError:
        return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    return str(_paths().find_file(folder_name, filename))


def filter_files_extensions(files: Any, extensions: Any) -> list[str]:
    wanted = {e.lower() for e in extensions}
    return sorted(f for f in files if not wanted or os.path.splitext(f)[1].lower() in wanted)


def recursive_search(directory: str, excluded_dir_names: list[str] | None = None
                     ) -> tuple[list[str], dict[str, float]]:
    """Relative file names under `directory` and each visited folder's mtime."""
    excluded = set(excluded_dir_names or ())
    files: list[str] = []
    folders: dict[str, float] = {}
    if not os.path.isdir(directory):
        return files, folders
    for root, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = [d for d in dirnames if d not in excluded]
        folders[root] = os.path.getmtime(root)
        files.extend(os.path.relpath(os.path.join(root, f), directory) for f in filenames)
    return files, folders


def get_save_image_path(filename_prefix: str, output_dir: str, image_width: int = 0,
                        image_height: int = 0) -> tuple[str, str, int, str, str]:
    """(full_output_folder, filename, counter, subfolder, filename_prefix) as ComfyUI's."""
    target = prepare_save(Path(output_dir), filename_prefix, width=image_width,
                          height=image_height)
    return str(target.folder), target.filename, target.counter, target.subfolder, filename_prefix


def get_input_subfolders() -> list[str]:
    root = _paths().input
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir())


def cache_helper() -> Any:
    """ComfyUI's file-list cache context; Loom lists folders on demand, so it does nothing."""
    return contextlib.nullcontext()


def get_system_user_directory(name: str = "system") -> str:
    return os.path.join(get_user_directory(), f"__{name}")


def get_public_user_directory(user: str) -> str | None:
    if not user or user.startswith("__"):
        return None
    return os.path.join(get_user_directory(), user)
