"""Fixtures shared by the node tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.context import NodeContext
from tests.node_testing import make_ctx


@pytest.fixture
def ctx(tmp_path: Path) -> NodeContext:
    """A node context over an empty base folder in tmp_path (files go to its output/, temp/)."""
    return make_ctx(tmp_path)
