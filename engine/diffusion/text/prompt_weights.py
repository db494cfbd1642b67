"""Prompt syntax with ComfyUI's semantics: `(text:1.2)` weights, `(text)` = x1.1, nesting,
`\\(` `\\)` escapes, and `embedding:name` textual-inversion references.

The weight rules (ComfyUI `token_weights`): a parenthesised group multiplies the weight around
it by 1.1; a `:number` after the group's last colon *replaces* the weight instead (so
`((a:1.5))` is 1.5 and `((a):1.5)` is 1.65). Unbalanced parentheses stay literal text.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from engine.paths import PathError, within

logger = logging.getLogger("loom.clip")

EmbeddingFinder = Callable[[str], Path | None]

EMBEDDING_PREFIX = "embedding:"
EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")
# Escaped parentheses are hidden behind these markers while the groups are parsed.
_ESCAPED = {"\\)": "\0\1", "\\(": "\0\2"}
# An embedding reference starts after whitespace (or at the start of a weighted segment).
_EMBEDDING_SPLIT = re.compile(r"(?<=\s)" + re.escape(EMBEDDING_PREFIX))
# A name ends before '<' or '[' (so "embedding:foo<lora:x>" keeps "<lora:x>" as text).
_NAME_END = re.compile(r"[<\[]")


@dataclass(frozen=True)
class PromptPiece:
    """A run of prompt text, or the vectors of one embedding, with its weight."""

    text: str
    weight: float
    vectors: torch.Tensor | None = None  # [N, width] for an embedding


def parse_weighted_prompt(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) segments; escapes are resolved in the result."""
    for escaped, marker in _ESCAPED.items():
        text = text.replace(escaped, marker)
    segments = _weigh_groups(text, 1.0)
    return [(_unescape(segment), weight) for segment, weight in segments]


def _unescape(text: str) -> str:
    for escaped, marker in _ESCAPED.items():
        text = text.replace(marker, escaped[1])
    return text


def _weigh_groups(text: str, weight: float) -> list[tuple[str, float]]:
    segments: list[tuple[str, float]] = []
    for part in split_top_level_groups(text):
        if len(part) < 2 or part[0] != "(" or part[-1] != ")":
            segments.append((part, weight))
            continue
        inner, group_weight = part[1:-1], weight * 1.1
        colon = inner.rfind(":")
        if colon > 0:
            explicit = _parse_weight(inner[colon + 1:])
            if explicit is not None:
                inner, group_weight = inner[:colon], explicit
        segments.extend(_weigh_groups(inner, group_weight))
    return segments


def _parse_weight(text: str) -> float | None:
    try:
        return float(text)  # Python's float syntax, as ComfyUI parses it
    except ValueError:
        return None


def split_top_level_groups(text: str) -> list[str]:
    """Split text into plain runs and top-level `(...)` groups.

    A ')' with no open group lowers the depth below zero and stays in the text; until the
    depth is back at zero, '(' and ')' are plain characters (ComfyUI's parse_parentheses).
    """
    parts: list[str] = []
    current, depth = "", 0
    for char in text:
        if char == "(":
            if depth == 0:
                if current:
                    parts.append(current)
                current = ""
            current += char
            depth += 1
        elif char == ")":
            depth -= 1
            current += char
            if depth == 0:
                parts.append(current)
                current = ""
        else:
            current += char
    if current:
        parts.append(current)
    return parts


def resolve_prompt_pieces(segments: list[tuple[str, float]], find_embedding: EmbeddingFinder | None,
                          embedding_key: str, width: int, warnings: list[str]) -> list[PromptPiece]:
    """Turn weighted segments into text pieces and embedding pieces (ComfyUI's rules).

    Without a `find_embedding` lookup, `embedding:name` is plain text. A missing or unusable
    embedding adds a warning (also logged to "loom.clip") and contributes no tokens; any text
    after its name is kept.
    """
    pieces: list[PromptPiece] = []
    for text, weight in segments:
        parts = _EMBEDDING_SPLIT.split(text)
        candidates = [parts[0], *(EMBEDDING_PREFIX + part for part in parts[1:])]
        for candidate in filter(None, candidates):
            if find_embedding is not None and candidate.startswith(EMBEDDING_PREFIX):
                pieces.extend(_embedding_pieces(candidate, weight, find_embedding,
                                                embedding_key, width, warnings))
            else:
                pieces.append(PromptPiece(candidate, weight))
    return pieces


def _embedding_pieces(reference: str, weight: float, find_embedding: EmbeddingFinder,
                      embedding_key: str, width: int, warnings: list[str]) -> list[PromptPiece]:
    words = reference[len(EMBEDDING_PREFIX):].strip("\n").split()
    if not words:  # a bare "embedding:" is text (ComfyUI fails on it)
        return [PromptPiece(reference, weight)]
    name, leftover = words[0], " ".join(words[1:])
    name_end = _NAME_END.search(name)
    if name_end is not None:
        leftover = name[name_end.start():] + (" " + leftover if leftover else "")
        name = name[:name_end.start()]
    vectors, problem = load_embedding(name, find_embedding, embedding_key, width)
    stripped = name.strip(",")
    if vectors is None and len(stripped) < len(name):
        vectors, problem = load_embedding(stripped, find_embedding, embedding_key, width)
        # ComfyUI's arithmetic: the tail after len(stripped) characters goes back to the text
        leftover = f"{name[len(stripped):]} {leftover}"
    pieces = []
    if vectors is None:
        message = f"embedding:{name} {problem}; it was left out of the prompt"
        logger.warning(message)
        warnings.append(message)
    else:
        pieces.append(PromptPiece(name, weight, vectors))
    if leftover:
        pieces.append(PromptPiece(leftover, weight))
    return pieces


def load_embedding(name: str, find_embedding: EmbeddingFinder, embedding_key: str,
                   width: int) -> tuple[torch.Tensor | None, str]:
    """The [N, width] vectors of embedding `name`, or None and the reason it is unusable."""
    path = find_embedding(name) if name else None
    if path is None:
        return None, "was not found in the embeddings folder (models/embeddings)"
    try:
        data = read_embedding_file(path)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError,
            safetensors.SafetensorError) as error:
        return None, f"could not be read from {path} ({error})"
    tensor = select_embedding_tensor(data, embedding_key, width)
    if tensor is None:
        return None, f"has no embedding tensor in {path}"
    vectors = tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() else tensor.reshape(1, 1)
    if vectors.shape[-1] != width:
        return None, (f"has vectors of width {vectors.shape[-1]} but this text encoder "
                      f"needs {width} (an embedding made for another model family?)")
    return vectors, ""


def read_embedding_file(path: Path) -> object:
    """A .safetensors dict, or a .pt/.bin object read with torch.load(weights_only=True)."""
    if path.suffix.lower() == ".safetensors":
        return safetensors.torch.load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def select_embedding_tensor(data: object, embedding_key: str, width: int) -> torch.Tensor | None:
    """The embedding tensor in a loaded file, in ComfyUI's order of preference.

    A1111 {"string_to_param": {"*": t}}; a list of dicts (rows of matching width);
    SDXL {"clip_l": t, "clip_g": t} by the encoder's key; {"emb_params": t}; a bare tensor;
    otherwise the file's first tensor.
    """
    if isinstance(data, torch.Tensor):
        return data
    if isinstance(data, list):
        rows = [t.reshape(-1, t.shape[-1]) for item in data if isinstance(item, Mapping)
                for t in item.values() if isinstance(t, torch.Tensor) and t.shape[-1] == width]
        return torch.cat(rows) if rows else None
    if not isinstance(data, Mapping):
        return None
    params = data.get("string_to_param")
    if isinstance(params, Mapping):
        return _first_tensor(params)
    for key in (embedding_key, "emb_params"):
        if isinstance(data.get(key), torch.Tensor):
            return data[key]
    return _first_tensor(data)


def _first_tensor(data: Mapping) -> torch.Tensor | None:
    return next((value for value in data.values() if isinstance(value, torch.Tensor)), None)


@dataclass(frozen=True)
class EmbeddingFolders:
    """`find_embedding` over folders and all their sub-folders (ComfyUI's lookup).

    `name` may carry an extension or not (.safetensors, .pt, .bin are tried in that order);
    a name that would leave its folder is refused.
    """

    folders: tuple[Path, ...]

    def __call__(self, name: str) -> Path | None:
        for folder in self._search_dirs():
            found = _find_in(folder, name)
            if found is not None:
                return found
        return None

    def _search_dirs(self) -> list[Path]:
        dirs: list[Path] = []
        for folder in self.folders:
            if folder.is_dir():
                for root, subdirs, _ in os.walk(folder, followlinks=True):
                    subdirs.sort()
                    dirs.append(Path(root))
        return dirs


def _find_in(folder: Path, name: str) -> Path | None:
    try:
        candidate = within(folder, name)  # the owner's links inside the folder are followed
    except PathError:
        return None
    if candidate.is_file():
        return candidate
    for extension in EMBEDDING_EXTENSIONS:
        with_extension = candidate.with_name(candidate.name + extension)
        if with_extension.is_file():
            return with_extension
    return None
