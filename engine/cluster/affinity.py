"""What a prompt needs and what a worker holds, in terms both sides can compute: the model files
a prompt names (checkpoints, LoRAs, ControlNets ... chosen from model folders), and structural
keys of its nodes (class, literals and the keys of what they read from), which match the nodes a
worker's output cache still holds from earlier prompts of the same shape."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.digest import stable_key
from engine.graph import Prompt
from engine.node import FilesIn
from engine.paths import ANNOTATED_FOLDERS, Paths, canonical_folder
from engine.registry import NodeRegistry

ModelFile = tuple[str, str]  # (folder kind, name relative to it), e.g. ("loras", "a.safetensors")


@dataclass(frozen=True)
class PromptNeeds:
    """What the scheduler compares against each worker's report."""

    models: frozenset[ModelFile]
    keys: frozenset[str]


def prompt_needs(prompt: Prompt, registry: NodeRegistry) -> PromptNeeds:
    return PromptNeeds(frozenset(model_files(prompt, registry)),
                       frozenset(structural_keys(prompt).values()))


def structural_keys(prompt: Prompt) -> dict[str, str]:
    """A key per node from the graph alone: equal keys mean equal upstream subgraphs."""
    keys: dict[str, str] = {}
    for node_id in prompt.nodes:
        stack = [node_id]
        while stack:
            current = stack[-1]
            node = prompt.nodes[current]
            missing = [src for src, _ in node.links.values()
                       if src in prompt.nodes and src not in keys and src not in stack]
            if missing:
                stack.extend(missing)
                continue
            stack.pop()
            links = tuple(sorted((name, keys.get(src, src), slot)
                                 for name, (src, slot) in node.links.items()))
            keys[current] = stable_key((node.class_type, node.literals, links))
    return keys


def model_files(prompt: Prompt, registry: NodeRegistry) -> set[ModelFile]:
    """The (folder, name) of every literal chosen from a model folder's file list."""
    found = set()
    for node in prompt.nodes.values():
        node_type = registry.get(node.class_type) if node.class_type else None
        if node_type is None:
            continue
        for spec in node_type.schema.inputs:
            choices = spec.choices
            value = node.literals.get(spec.name)
            if (isinstance(choices, FilesIn) and choices.folder not in ANNOTATED_FOLDERS
                    and isinstance(value, str)):
                found.add((canonical_folder(choices.folder), value))
    return found


def loaded_model_files(manager: Any, paths: Paths) -> list[ModelFile]:
    """The model files whose weights a model manager holds now, named as in `paths`."""
    entries = manager.entries() if hasattr(manager, "entries") else ()
    loaded = {Path(entry.key.path) for entry in entries if not entry.evicted}
    found = set()
    for path in loaded:
        named = name_in_folders(path, paths)
        if named is not None:
            found.add(named)
    return sorted(found)


def name_in_folders(path: Path, paths: Paths) -> ModelFile | None:
    for kind, directories in paths.models.items():
        for directory in directories:
            root = directory.resolve()
            if root in path.parents:
                return kind, path.relative_to(root).as_posix()
    return None


def available_model_files(paths: Paths, kinds: Iterable[str] | None = None,
                          ) -> dict[str, list[str]]:
    """The files of each model folder kind (what this machine could load)."""
    return {kind: paths.list_files(kind) for kind in (kinds or paths.models)}
