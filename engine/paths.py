"""Where models, inputs, outputs and user files live: ComfyUI's folder layout, plus the folders
an `extra_model_paths.yaml` adds (so an existing A1111 or ComfyUI model folder works as is).

Names that arrive in a request never leave their folder by themselves. Two rules for links:
model folders follow the links their owner placed inside them (a file or a whole sub-folder
shared with ComfyUI or A1111), since their files are only loaded, never served or written; in
input/, output/, temp/ and user/, which the API reads, writes and serves, a link must stay inside
the folder once resolved (point the folder itself elsewhere with --output-directory etc.)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

MODEL_EXTENSIONS = frozenset({".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl",
                              ".sft"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# The folders a file name may be annotated with, as in ComfyUI's "cat.png [output]".
ANNOTATED_FOLDERS = ("output", "input", "temp")

# A kind listed as folders, not files: the directories holding a diffusers model_index.json.
FOLDER_KIND = "folder"
FOLDER_MARKER = "model_index.json"
# folder kind -> (sub-folders of models/ searched by default, file extensions listed)
MODEL_FOLDERS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "checkpoints": (("checkpoints",), MODEL_EXTENSIONS),
    "configs": (("configs",), frozenset({".yaml"})),
    "loras": (("loras",), MODEL_EXTENSIONS),
    "vae": (("vae",), MODEL_EXTENSIONS),
    "text_encoders": (("text_encoders", "clip"), MODEL_EXTENSIONS),
    "diffusion_models": (("unet", "diffusion_models"), MODEL_EXTENSIONS),
    "clip_vision": (("clip_vision",), MODEL_EXTENSIONS),
    "style_models": (("style_models",), MODEL_EXTENSIONS),
    "embeddings": (("embeddings",), MODEL_EXTENSIONS),
    "diffusers": (("diffusers",), frozenset({FOLDER_KIND})),
    "vae_approx": (("vae_approx",), MODEL_EXTENSIONS),
    "controlnet": (("controlnet", "t2i_adapter"), MODEL_EXTENSIONS),
    "gligen": (("gligen",), MODEL_EXTENSIONS),
    "upscale_models": (("upscale_models",), MODEL_EXTENSIONS),
    "hypernetworks": (("hypernetworks",), MODEL_EXTENSIONS),
    "photomaker": (("photomaker",), MODEL_EXTENSIONS),
    "classifiers": (("classifiers",), frozenset({""})),
}
# Old folder names ComfyUI still accepts in yaml files and node code.
FOLDER_ALIASES = {"clip": "text_encoders", "unet": "diffusion_models", "t2i_adapter": "controlnet"}


NAME_MAX = 255  # bytes in one file or folder name (ext4, APFS, NTFS in UTF-16 units)
PATH_MAX = 4096  # bytes in a whole path (Linux)
_SEPARATORS = re.compile(r"[/\\]")


class PathError(ValueError):
    """A file name that is unknown or points outside the folder it must stay in."""


class InvalidName(PathError):
    """A name no folder can hold: empty, with a NUL byte or a lone surrogate, or too long."""


def canonical_folder(kind: str) -> str:
    return FOLDER_ALIASES.get(kind, kind)


def name_parts(relative: str) -> list[str]:
    """The '/'- or '\\'-separated parts of a requested name; InvalidName when no file system
    could hold it (so the request fails as a bad name, not deep inside an OS call)."""
    if not relative or "\x00" in relative:
        raise InvalidName(f"invalid file name {relative!r}: give a non-empty name without NUL")
    try:
        size = len(relative.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidName(f"invalid file name {relative[:60]!r}: {exc.reason}") from exc
    if size > PATH_MAX:
        raise InvalidName(f"the name {relative[:40]!r}... is {size} bytes long; at most "
                          f"{PATH_MAX} are accepted")
    parts = _SEPARATORS.split(relative)
    for part in parts:
        if len(part.encode("utf-8")) > NAME_MAX:
            raise InvalidName(f"{part[:40]!r}... is {len(part.encode('utf-8'))} bytes long; a "
                              f"file or folder name holds at most {NAME_MAX}: shorten it")
    return parts


def within(root: Path, relative: str) -> Path:
    """`root / relative` for a model folder: the name may not climb out by itself (absolute, a
    drive, any '..' part), but links the folder's owner placed inside are followed wherever they
    point (ComfyUI does the same for shared model stores)."""
    parts = name_parts(relative)
    if relative.startswith(("/", "\\")) or relative[1:2] == ":" or ".." in parts:
        raise PathError(f"{relative!r} points outside {root}; use a name inside that folder "
                        f"(no '..', no absolute path)")
    return root / relative


def confine(root: Path, relative: str) -> Path:
    """`root / relative` with symlinks resolved, refusing anything that escapes `root` (the rule
    for input/, output/, temp/ and user/)."""
    name_parts(relative)
    base = root.resolve()
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise PathError(f"{relative!r} points outside {base}; use a name inside that folder")
    return target


@dataclass
class Paths:
    """All folders one Loom process uses. Created once in main.py and passed down."""

    base: Path
    output: Path
    input: Path
    temp: Path
    user: Path
    models: dict[str, list[Path]] = field(default_factory=dict)
    extensions: dict[str, frozenset[str]] = field(default_factory=dict)
    custom_nodes: list[Path] = field(default_factory=list)

    @classmethod
    def from_base(cls, base: Path, *, output: Path | None = None, input: Path | None = None,
                  temp: Path | None = None, user: Path | None = None,
                  models: Path | None = None) -> Paths:
        base = base.resolve()
        models_root = Path(models).resolve() if models is not None else base / "models"
        paths = cls(base=base, output=(output or base / "output").resolve(),
                    input=(input or base / "input").resolve(),
                    temp=(temp or base / "temp").resolve(), user=(user or base / "user").resolve())
        for kind, (subdirs, exts) in MODEL_FOLDERS.items():
            paths.models[kind] = [models_root / sub for sub in subdirs]
            paths.extensions[kind] = exts
        paths.custom_nodes.append(base / "custom_nodes")
        return paths

    def create_working_dirs(self) -> None:
        """Create input/, output/, temp/ and user/ when missing, as ComfyUI does at start
        (custom-node packs list and write into them without checking)."""
        for directory in (self.input, self.output, self.temp, self.user):
            directory.mkdir(parents=True, exist_ok=True)

    def add_model_dir(self, kind: str, directory: Path, *, first: bool = False) -> None:
        kind = canonical_folder(kind)
        dirs = self.models.setdefault(kind, [])
        self.extensions.setdefault(kind, MODEL_EXTENSIONS)
        if directory in dirs:
            return
        dirs.insert(0, directory) if first else dirs.append(directory)

    def folder_dirs(self, kind: str) -> list[Path]:
        """Directories searched for a folder kind ("input"/"output"/"temp" included)."""
        special = {"input": self.input, "output": self.output, "temp": self.temp}
        if kind in special:
            return [special[kind]]
        kind = canonical_folder(kind)
        if kind not in self.models:
            raise PathError(f"unknown model folder {kind!r}; known: {sorted(self.models)}")
        return self.models[kind]

    def list_files(self, kind: str) -> list[str]:
        """File names (relative, '/'-separated, sorted) found in every folder of a kind."""
        found: set[str] = set()
        for directory in self.folder_dirs(kind):
            found.update(self.files_in(kind, directory))
        return sorted(found)

    def files_in(self, kind: str, directory: Path) -> list[str]:
        """The files of a kind in one of its directories (relative, '/'-separated, unsorted)."""
        exts = IMAGE_EXTENSIONS if kind in ("input", "output", "temp") else \
            self.extensions.get(canonical_folder(kind), MODEL_EXTENSIONS)
        if FOLDER_KIND in exts:
            return _walk_model_folders(directory)
        return _walk_files(directory, exts, recurse=kind not in ("input",))

    def find_file(self, kind: str, name: str) -> Path:
        """The first existing file `name` in the folders of a kind, confined to that folder
        (model folders follow their owner's links; see the module docstring)."""
        dirs = self.folder_dirs(kind)
        place = confine if kind in ("input", "output", "temp") else within
        for directory in dirs:
            candidate = place(directory, name)
            if candidate.is_file():
                return candidate
        where = ", ".join(str(d) for d in dirs)
        raise PathError(f"{name!r} was not found in the {kind} folder(s) ({where}); put the file "
                        f"there or pick one of the listed names")

    def find_folder(self, kind: str, name: str) -> Path:
        """The first model folder `name` (one holding a model_index.json) of a folder kind."""
        dirs = self.folder_dirs(kind)
        for directory in dirs:
            candidate = confine(directory, name)
            if (candidate / FOLDER_MARKER).is_file():
                return candidate
        where = ", ".join(str(d) for d in dirs)
        raise PathError(f"{name!r} was not found in the {kind} folder(s) ({where}); put the "
                        f"model folder (with its {FOLDER_MARKER}) there or pick a listed name")

    def load_extra_config(self, config: Path) -> None:
        """Add the folders of an extra_model_paths.yaml (ComfyUI's format)."""
        for kind, directory, first in parse_extra_model_paths(config):
            if kind == "custom_nodes":
                if directory not in self.custom_nodes:
                    self.custom_nodes.append(directory)
            else:
                self.add_model_dir(kind, directory, first=first)


def _walk_files(directory: Path, exts: Iterable[str], *, recurse: bool) -> list[str]:
    if not directory.is_dir():
        return []
    exts = frozenset(exts)
    names = []
    seen: set[tuple[int, int]] = set()  # folders already walked: a link loop ends here
    for root, dirnames, filenames in os.walk(directory, followlinks=True):
        stat = os.stat(root)
        if (stat.st_dev, stat.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recurse else []
        rel_root = Path(root).relative_to(directory)
        for filename in filenames:
            if filename.startswith(".") or Path(filename).suffix.lower() not in exts:
                continue
            names.append((rel_root / filename).as_posix())
    return names


def _walk_model_folders(directory: Path) -> list[str]:
    """Folders under `directory` holding a model_index.json, relative ('.' for itself), as
    ComfyUI's DiffusersLoader lists them."""
    if not directory.is_dir():
        return []
    found = []
    for root, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if FOLDER_MARKER in filenames:
            found.append(Path(root).relative_to(directory).as_posix())
    return found


def parse_extra_model_paths(config: Path) -> list[tuple[str, Path, bool]]:
    """(folder kind, directory, put-first) triples from an extra_model_paths.yaml."""
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PathError(f"cannot read extra model paths file {config}: {exc}") from exc
    if not isinstance(data, dict):
        raise PathError(f"{config}: expected a mapping of sections, got {type(data).__name__}")
    entries = []
    for section, values in data.items():
        if not isinstance(values, dict):
            raise PathError(f"{config}: section {section!r} must be a mapping of folder: path")
        base = _base_path(config, values.get("base_path"))
        first = bool(values.get("is_default", False))
        for kind, value in values.items():
            if kind in ("base_path", "is_default") or value is None:
                continue
            for line in str(value).splitlines():
                if line.strip():
                    path = Path(os.path.expandvars(os.path.expanduser(line.strip())))
                    entries.append((kind, (base / path).resolve(), first))
    return entries


def _base_path(config: Path, base: object) -> Path:
    if base is None:
        return config.parent.resolve()
    path = Path(os.path.expandvars(os.path.expanduser(str(base))))
    return path if path.is_absolute() else (config.parent / path)


def split_annotation(name: str, default: str = "input") -> tuple[str, str]:
    """("output", "a.png") for "a.png [output]"; names without a [folder] tag use `default`."""
    for folder in ANNOTATED_FOLDERS:
        tag = f"[{folder}]"
        if name.endswith(tag):
            return folder, name[:-len(tag)].removesuffix(" ")
    return default, name
