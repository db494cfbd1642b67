"""The set of node types one Loom process knows: an object handed to the executor and server."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.node import Node
from engine.schema import object_info_entry


class RegistryError(ValueError):
    """A node type that cannot be registered (bad declaration, name taken)."""


@dataclass(frozen=True)
class PackError:
    """A custom-node pack that failed to load, kept so the user can be told why."""

    name: str
    path: Path
    traceback: str
    summary: str = ""  # what is missing and how to fix it, one line (shown in the editor)

    def to_json(self) -> dict[str, str]:
        return {"pack": self.name, "path": str(self.path), "summary": self.summary,
                "traceback": self.traceback}


class NodeRegistry:
    """Node types by class_type, plus what custom-node packs contributed."""

    def __init__(self) -> None:
        self._types: dict[str, type[Node]] = {}
        self.web_directories: dict[str, Path] = {}
        self.pack_errors: list[PackError] = []
        self.loaded_packs: list[str] = []

    def register(self, node_type: type[Node], *, replace: bool = False) -> None:
        schema = getattr(node_type, "schema", None)
        if schema is None:
            raise RegistryError(f"{node_type.__qualname__} has no `schema`; declare a NodeSchema")
        if schema.name in self._types and not replace:
            raise RegistryError(f"node type {schema.name!r} is already registered by "
                                f"{self._types[schema.name].__module__}")
        self._types[schema.name] = node_type

    def register_all(self, node_types: Iterable[type[Node]]) -> None:
        for node_type in node_types:
            self.register(node_type)

    def get(self, class_type: str) -> type[Node] | None:
        return self._types.get(class_type)

    def __contains__(self, class_type: object) -> bool:
        return class_type in self._types

    def __iter__(self) -> Iterator[str]:
        return iter(self._types)

    def __len__(self) -> int:
        return len(self._types)

    def object_info(self, env: Any = None) -> dict[str, dict[str, Any]]:
        """`GET /object_info`: every node type's schema (combo file lists resolved via env)."""
        return {name: object_info_entry(node.schema, env) for name, node in self._types.items()}

    def object_info_for(self, class_type: str, env: Any = None) -> dict[str, Any] | None:
        node = self._types.get(class_type)
        return None if node is None else object_info_entry(node.schema, env)
