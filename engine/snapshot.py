"""Frozen copies of an API prompt's node bodies, to tell which nodes changed since an earlier
prompt (the editor posts the same graph again with one widget changed).

A node's snapshot is its body in marshal's format: about as cheap to make as comparing two
bodies, and unaffected by later changes to the body's objects, which belong to the caller."""

from __future__ import annotations

import marshal
from collections.abc import Mapping
from typing import Any

MARSHAL_VERSION = 2  # the last version without back-references: equal bodies, equal bytes


class _Unfrozen:
    """Stands for a body marshal cannot write: equal to nothing but itself."""


class PromptSnapshot:
    """Per node id, the frozen node body."""

    __slots__ = ("nodes",)

    def __init__(self, api: Mapping[str, Any]) -> None:
        try:  # one marshal call per node, no other call: this runs for every node posted
            self.nodes: dict[str, bytes | _Unfrozen] = {
                str(node_id): marshal.dumps(body, MARSHAL_VERSION)
                for node_id, body in api.items()}
        except ValueError:
            self.nodes = {str(node_id): _freeze(body) for node_id, body in api.items()}

    def same_as(self, other: PromptSnapshot | None) -> bool:
        """Whether `other` has the same nodes with the same bodies."""
        return other is self or (other is not None and self.nodes == other.nodes)

    def unchanged(self, node_id: str, other: PromptSnapshot) -> bool:
        """Whether node `node_id` has the same body in `other`."""
        return self.nodes[node_id] == other.nodes.get(node_id)

    def changed_since(self, other: PromptSnapshot) -> list[str]:
        """The nodes whose body differs in `other` or that `other` lacks, in order."""
        before = other.nodes
        return [node_id for node_id, frozen in self.nodes.items()
                if before.get(node_id) != frozen]


def _freeze(body: Any) -> bytes | _Unfrozen:
    try:
        return marshal.dumps(body, MARSHAL_VERSION)
    except ValueError:  # an object marshal cannot write (not a JSON value): never unchanged
        return _Unfrozen()
