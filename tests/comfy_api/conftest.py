"""An engine with the test packs of tests/packs loaded through ComfyUI's module API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import comfy_host
from engine.custom_nodes import load_custom_nodes
from main import bind_comfy_api
from tests.model_engine import ModelEngine

PACKS = Path(__file__).resolve().parents[1] / "packs"


def bind_engine(engine: ModelEngine) -> None:
    """Bind ComfyUI's module singletons to the engine's objects and load the test packs."""
    bind_comfy_api(engine.services, engine.registry, engine.executor.interrupt)
    load_custom_nodes(engine.registry, [PACKS])


@pytest.fixture(scope="module")
def packs_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelEngine]:
    engine = ModelEngine(tmp_path_factory.mktemp("comfy_api"))
    bind_engine(engine)
    yield engine
    comfy_host.unbind()


@pytest.fixture
def bound(packs_engine: ModelEngine) -> ModelEngine:
    """The module's engine, bound again (another module's fixture may have rebound it)."""
    comfy_host.bind(packs_engine.services, packs_engine.registry, packs_engine.executor.interrupt)
    return packs_engine
