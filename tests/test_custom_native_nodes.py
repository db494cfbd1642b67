"""Custom-node packs may also export Loom-native Node subclasses in NODE_CLASS_MAPPINGS."""

from __future__ import annotations

from pathlib import Path

from engine.custom_nodes import load_custom_nodes
from engine.registry import NodeRegistry

NATIVE_PACK = '''
from engine.node import Int, Node, NodeSchema, Output


class Doubler(Node):
    schema = NodeSchema("Doubler", (Int("value", 1),), (Output("INT"),))

    def execute(self, ctx, value):
        return (value * 2,)


class Misnamed(Node):
    schema = NodeSchema("SomethingElse", (), (Output("INT"),))


NODE_CLASS_MAPPINGS = {"Doubler": Doubler, "Misnamed": Misnamed}
'''


def test_native_node_is_registered_as_declared_and_a_name_mismatch_is_reported(
        tmp_path: Path) -> None:
    folder = tmp_path / "custom_nodes"
    folder.mkdir()
    (folder / "native.py").write_text(NATIVE_PACK)
    registry = NodeRegistry()
    load_custom_nodes(registry, [folder])
    doubler = registry.get("Doubler")
    assert doubler is not None and doubler.__name__ == "Doubler"  # not a classic adapter
    assert "Misnamed" not in registry and "SomethingElse" not in registry
    assert "schema name is 'SomethingElse'" in registry.pack_errors[0].traceback
