"""File naming shared by the saving and loading nodes: ComfyUI's `filename_prefix` rules
(subfolders, %tokens%, `<name>_<counter:05>_` counters), annotated names ("a.png [output]"),
content hashes, and combo lists of one file suffix."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from engine.context import NodeContext
from engine.node import ChoiceSource, Node
from engine.paths import PathError, Paths, split_annotation

_DATE_TOKEN = re.compile(r"%date:([^%]*)%")
# The editor's date pattern letters (longest first so "yyyy" wins over "yy").
_DATE_FIELD = re.compile(r"yyyy|yy|MM|M|dd|d|hh|h|mm|m|ss|s")


@dataclass(frozen=True)
class SaveTarget:
    """Where a batch of files goes: `folder` on disk, and its name parts for the UI."""

    folder: Path
    subfolder: str
    filename: str
    counter: int

    def file_name(self, index: int, suffix: str, batch_number: int = 0) -> str:
        """`<filename>_<counter:05>_<suffix>` for the index-th file written from this target."""
        stem = self.filename.replace("%batch_num%", str(batch_number))
        return f"{stem}_{self.counter + index:05}_{suffix}"


def format_date(pattern: str, now: datetime) -> str:
    """The editor's %date:pattern% (yyyy, yy, MM, M, dd, d, hh, h, mm, m, ss, s)."""
    fields = {"yyyy": f"{now.year:04}", "yy": f"{now.year % 100:02}",
              "MM": f"{now.month:02}", "M": str(now.month), "dd": f"{now.day:02}",
              "d": str(now.day), "hh": f"{now.hour:02}", "h": str(now.hour),
              "mm": f"{now.minute:02}", "m": str(now.minute), "ss": f"{now.second:02}",
              "s": str(now.second)}
    return _DATE_FIELD.sub(lambda match: fields[match.group(0)], pattern)


def expand_prefix(prefix: str, width: int, height: int, now: datetime) -> str:
    """Replace %date:...%, %width%, %height%, %year%, %month%, %day%, %hour%, %minute%, %second%."""
    if "%" not in prefix:
        return prefix
    prefix = _DATE_TOKEN.sub(lambda match: format_date(match.group(1), now), prefix)
    tokens = {"width": str(width), "height": str(height), "year": str(now.year),
              "month": f"{now.month:02}", "day": f"{now.day:02}", "hour": f"{now.hour:02}",
              "minute": f"{now.minute:02}", "second": f"{now.second:02}"}
    for token, value in tokens.items():
        prefix = prefix.replace(f"%{token}%", value)
    return prefix


def counter_in_name(entry: str, filename: str) -> int | None:
    """The counter of `<filename>_<digits>_...` (0 if not digits), None for other names."""
    size = len(filename)
    if os.path.normcase(entry[:size]) != os.path.normcase(filename) or entry[size:size + 1] != "_":
        return None
    digits = entry[size + 1:].split("_")[0]
    return int(digits) if digits.isascii() and digits.isdigit() else 0


def next_counter(folder: Path, filename: str) -> int:
    """One past the highest counter already used by `filename` in `folder` (1 when none)."""
    if not folder.is_dir():
        return 1
    counters = (counter_in_name(entry, filename) for entry in os.listdir(folder))
    return max((c for c in counters if c is not None), default=0) + 1


def prepare_save(root: Path, prefix: str, *, width: int = 0, height: int = 0,
                 now: datetime | None = None) -> SaveTarget:
    """Resolve a filename_prefix under `root`, create its folder and find the next counter.

    Raises PathError for a prefix that leaves `root` or has no file name part."""
    expanded = expand_prefix(prefix, width, height, now or datetime.now())
    normal = os.path.normpath(expanded)
    subfolder, filename = os.path.dirname(normal), os.path.basename(normal)
    if filename in ("", ".", ".."):
        raise PathError(f"filename_prefix {prefix!r} has no file name part; use a name such as "
                        f"'ComfyUI' or 'subfolder/ComfyUI'")
    base = root.resolve()
    folder = (base / subfolder).resolve()
    if folder != base and base not in folder.parents:
        raise PathError(f"filename_prefix {prefix!r} would save outside the folder {base}; "
                        f"use a relative name such as 'subfolder/ComfyUI' without '..'")
    folder.mkdir(parents=True, exist_ok=True)
    relative = folder.relative_to(base).as_posix()
    return SaveTarget(folder, "" if relative == "." else relative, filename,
                      next_counter(folder, filename))


def find_annotated(paths: Paths, name: str, default: str = "input") -> Path:
    """The file an annotated name points to; PathError when it does not exist there."""
    folder, bare = split_annotation(name, default)
    return paths.find_file(folder, bare)


def annotated_exists(paths: Paths, name: Any, default: str = "input") -> bool:
    """Whether `name` (possibly annotated) is an existing file in its folder."""
    if not isinstance(name, str):
        return False
    try:
        find_annotated(paths, name, default)
    except PathError:
        return False
    return True


def file_fingerprint(paths: Paths, name: Any, default: str = "input") -> str:
    """sha256 of a (possibly annotated) file; a marker for a missing one, which execute reports."""
    if not annotated_exists(paths, name, default):
        return f"missing:{name}"
    return file_sha256(find_annotated(paths, name, default))


def invalid_file(paths: Paths | None, name: Any, input_name: str,
                 message: str, default: str = "input") -> tuple[str, str] | None:
    """(input_name, "<message>: <name>") when the file is missing; None when it exists.

    Without folders (validation with no services) there is nothing to check against."""
    if paths is None or annotated_exists(paths, name, default):
        return None
    return input_name, f"{message}: {name}"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FilesWithSuffix(ChoiceSource):
    """The files directly inside a folder kind whose names end with `suffix` (e.g. .latent)."""

    folder: str
    suffix: str

    def resolve(self, env: Any) -> list[str]:
        paths = getattr(env, "paths", None)
        if paths is None:
            return []
        return sorted(entry.name for directory in paths.folder_dirs(self.folder)
                      if directory.is_dir() for entry in directory.iterdir()
                      if entry.is_file() and entry.name.endswith(self.suffix))

    def placeholder(self) -> str:
        return f"<files in {self.folder}>"


class InputFileNode(Node):
    """Base of nodes that read one file from the input folder, named by the input
    `file_input`: fingerprinted by content hash, and refused at validation when missing."""

    file_input: ClassVar[str]
    invalid_message: ClassVar[str]
    # The folder a name without a " [input]"/" [output]"/" [temp]" tag is looked up in.
    default_folder: ClassVar[str] = "input"

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        return file_fingerprint(ctx.paths, inputs.get(self.file_input), self.default_folder)

    def validate(self, ctx: NodeContext, **inputs: Any) -> tuple[str, str] | None:
        paths = getattr(ctx.services, "paths", None)
        return invalid_file(paths, inputs.get(self.file_input), self.file_input,
                            self.invalid_message, self.default_folder)

    @classmethod
    def self_validated_inputs(cls) -> frozenset[str]:
        return frozenset({cls.file_input})
