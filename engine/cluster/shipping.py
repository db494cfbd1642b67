"""Files that travel through Ray's object store (no shared filesystem is assumed): the input
files a prompt names go from the server to the worker; the files its output nodes write go from
the worker's private staging folders to the server's output and temp folders."""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.cluster.protocol import ShippedFile
from engine.graph import Prompt
from engine.paths import ANNOTATED_FOLDERS, PathError, Paths, confine, split_annotation

logger = logging.getLogger("loom.cluster.files")

SHIPPED_KINDS = ("output", "temp")  # UI entries of these types name files to bring back
REMEMBERED_NAMES = 65536  # worker name -> server name pairs kept for cached outputs
MAX_NAME_CHARS = 1024  # longer literals are text, never looked up as files
_COUNTED = re.compile(r"^(?P<stem>.+)_(?P<counter>\d{5,})_(?P<rest>.*)$")


def folder_of(paths: Paths, kind: str) -> Path:
    return {"output": paths.output, "temp": paths.temp, "input": paths.input}[kind]


def located(paths: Paths, kind: str, subfolder: str, filename: str) -> Path:
    """The file's path inside its folder kind; PathError if the name leaves that folder."""
    relative = f"{subfolder}/{filename}" if subfolder else filename
    return confine(folder_of(paths, kind), relative)


def subfolder_path(paths: Paths, kind: str, subfolder: str) -> Path:
    root = folder_of(paths, kind)
    return confine(root, subfolder) if subfolder else root.resolve()


# -- server -> worker ---------------------------------------------------------------------------
def input_files(prompt: Prompt, paths: Paths) -> list[ShippedFile]:
    """Every file in the server's input/output/temp folders that a literal input names
    ("a.png", "sub/a.png", "a.png [output]"): what LoadImage and friends will read."""
    found: dict[tuple[str, str, str], ShippedFile] = {}
    for node in prompt.nodes.values():
        for value in node.literals.values():
            shipped = _named_file(value, paths) if isinstance(value, str) and value else None
            if shipped is not None:
                found.setdefault(shipped.key, shipped)
    return list(found.values())


def _named_file(value: str, paths: Paths) -> ShippedFile | None:
    kind, name = split_annotation(value)
    if kind not in ANNOTATED_FOLDERS or len(name) > MAX_NAME_CHARS or "\n" in name:
        return None  # prompt text, not a file name
    try:
        path = confine(folder_of(paths, kind), name)
        if not path.is_file():
            return None
    except (PathError, OSError):
        return None
    subfolder, _, filename = name.replace("\\", "/").rpartition("/")
    return ShippedFile(kind, subfolder, filename, path.read_bytes())


def stage_inputs(files: list[ShippedFile], paths: Paths) -> None:
    """Write shipped input files into this worker's own folders (replacing older copies)."""
    for shipped in files:
        target = located(paths, shipped.kind, shipped.subfolder, shipped.filename)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_file() or target.read_bytes() != shipped.data:
            target.write_bytes(shipped.data)


# -- worker -> server ---------------------------------------------------------------------------
def file_entries(ui: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The entries of a node's UI dict that name an output or temp file."""
    for value in ui.values():
        if not isinstance(value, list):
            continue
        for entry in value:
            if (isinstance(entry, dict) and isinstance(entry.get("filename"), str)
                    and entry.get("type") in SHIPPED_KINDS):
                yield entry


def entry_key(entry: dict[str, Any]) -> tuple[str, str, str]:
    return (str(entry["type"]), str(entry.get("subfolder") or ""), str(entry["filename"]))


class OutputCollector:
    """Reads the files a worker's output nodes wrote, once each. A shipped file is left as an
    empty stand-in so the node's `<prefix>_<counter>_` numbering keeps counting up, which keeps
    every name this worker reports unique for its lifetime."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self._shipped: set[tuple[str, str, str]] = set()

    def collect(self, ui: dict[str, Any]) -> list[ShippedFile]:
        files = []
        for entry in file_entries(ui):
            key = entry_key(entry)
            if key in self._shipped:
                continue  # a cached node naming a file that already went to the server
            path = located(self.paths, *key)
            if not path.is_file():
                logger.warning("output %s named by a node does not exist; not shipped", path)
                continue
            files.append(ShippedFile(*key, path.read_bytes()))
            path.write_bytes(b"")
            self._shipped.add(key)
        return files


class FileLanding:
    """Writes shipped outputs into the server's folders, never over an existing file: a name
    already taken gets the next free counter (`ComfyUI_00007_.png`), or `_N` for other names.
    Remembers each worker's name for the landed file, so outputs a worker later reports from
    its cache point at the same server file."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self._lock = threading.Lock()
        self._names: OrderedDict[tuple[int, str, str, str], tuple[str, str]] = OrderedDict()
        self._last_counter: dict[tuple[Path, str, str], int] = {}

    def land(self, worker: int, files: list[ShippedFile]) -> list[Path]:
        """Write `files` from worker `worker`; returns where each landed."""
        landed = []
        with self._lock:
            for shipped in files:
                path = self._write(shipped)
                relative = path.parent.relative_to(folder_of(self.paths, shipped.kind).resolve())
                subfolder = "" if relative == Path(".") else relative.as_posix()
                self._remember((worker, *shipped.key), (subfolder, path.name))
                landed.append(path)
        return landed

    def rename(self, worker: int, ui: dict[str, Any]) -> dict[str, Any]:
        """A copy of a UI dict with worker file names replaced by the server's."""
        renamed: dict[str, Any] = {}
        for name, value in ui.items():
            renamed[name] = ([self._renamed_entry(worker, item) for item in value]
                             if isinstance(value, list) else value)
        return renamed

    def forget(self, worker: int) -> None:
        """A worker restarted: its old names mean nothing any more."""
        with self._lock:
            for key in [k for k in self._names if k[0] == worker]:
                del self._names[key]

    def _renamed_entry(self, worker: int, entry: Any) -> Any:
        if not (isinstance(entry, dict) and isinstance(entry.get("filename"), str)
                and entry.get("type") in SHIPPED_KINDS):
            return entry
        with self._lock:
            server_name = self._names.get((worker, *entry_key(entry)))
        if server_name is None:
            return entry
        return {**entry, "subfolder": server_name[0], "filename": server_name[1]}

    def _remember(self, key: tuple[int, str, str, str], value: tuple[str, str]) -> None:
        self._names[key] = value
        self._names.move_to_end(key)
        while len(self._names) > REMEMBERED_NAMES:
            self._names.popitem(last=False)

    def _write(self, shipped: ShippedFile) -> Path:
        folder = subfolder_path(self.paths, shipped.kind, shipped.subfolder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in self._candidates(folder, shipped.filename):
            path = folder / name
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(shipped.data)
            self._note_counter(folder, name)
            return path
        raise AssertionError("unreachable: candidate names never run out")

    def _candidates(self, folder: Path, filename: str) -> Iterator[str]:
        yield filename
        match = _COUNTED.match(filename)
        if match is None:
            stem, suffix = os.path.splitext(filename)
            yield from (f"{stem}_{n}{suffix}" for n in itertools.count(1))
            return
        stem, rest = match["stem"], match["rest"]
        start = max(int(match["counter"]), self._last_counter.get((folder, stem, rest), 0)) + 1
        yield from (f"{stem}_{n:05}_{rest}" for n in itertools.count(start))

    def _note_counter(self, folder: Path, name: str) -> None:
        match = _COUNTED.match(name)
        if match is not None:
            key = (folder, match["stem"], match["rest"])
            self._last_counter[key] = max(self._last_counter.get(key, 0), int(match["counter"]))
