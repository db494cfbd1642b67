"""Weights that are views of a mapped model file give their pages back when another model runs,
and read back unchanged; memory the process wrote or owns is never dropped."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from engine.diffusion.checkpoints.safetensors_io import SafetensorsFile
from engine.diffusion.memory.devices import DevicePolicy
from engine.diffusion.memory.model_manager import ModelKey, ModelManager
from engine.diffusion.memory.page_release import PageReleaser, mapping_of, page_interiors

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc/self/smaps and calls madvise (Linux)")

PAGE = mmap.PAGESIZE
POLICY = DevicePolicy.decide(cpu=True, force_fp32=True)


class Mapped(nn.Module):
    """A module whose two weights are views of a safetensors file (as a loaded UNet's are)."""

    def __init__(self, opened: SafetensorsFile) -> None:
        super().__init__()
        self.first = nn.Parameter(opened["first"], requires_grad=False)
        self.second = nn.Parameter(opened["second"], requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.first.sum() + self.second.sum()


def write_weights(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weights = {name: torch.randn(512, 1024, generator=generator) for name in ("first", "second")}
    save_file(weights, str(path))
    return weights


def resident(module: Mapped) -> int:
    mapping = mapping_of(module.first)
    assert mapping is not None, "the weight should be a view of the mapped file"
    return mapping.rss


def read_all(module: Mapped) -> None:
    module(torch.zeros(1))


def test_page_interiors_keep_only_whole_pages_and_merge_neighbours() -> None:
    assert page_interiors([(10, PAGE - 1)]) == []
    assert page_interiors([(1, 3 * PAGE + 5)]) == [(PAGE, 3 * PAGE)]
    assert page_interiors([(2 * PAGE, 4 * PAGE), (0, 2 * PAGE), (6 * PAGE, 7 * PAGE)]) == [
        (0, 4 * PAGE), (6 * PAGE, 7 * PAGE)]


def test_released_weights_leave_memory_and_read_back_unchanged(tmp_path: Path) -> None:
    expected = write_weights(tmp_path / "w.safetensors")
    module = Mapped(SafetensorsFile(tmp_path / "w.safetensors"))
    read_all(module)
    before = resident(module)
    assert before >= 4 * 2**20 - 2 * PAGE

    released = PageReleaser().release([module])

    assert released >= 4 * 2**20 - 2 * PAGE
    assert resident(module) <= before - released + PAGE
    assert torch.equal(module.first, expected["first"])
    assert torch.equal(module.second, expected["second"])


def test_a_mapping_the_process_wrote_into_is_left_alone(tmp_path: Path) -> None:
    write_weights(tmp_path / "w.safetensors")
    module = Mapped(SafetensorsFile(tmp_path / "w.safetensors"))
    with torch.no_grad():
        module.first[0, 0] = 123.0  # a copy-on-write page: dropping it would bring back the file

    assert PageReleaser().release([module]) == 0
    assert module.first[0, 0].item() == 123.0


def test_weights_in_anonymous_memory_are_not_touched() -> None:
    module = nn.Linear(1024, 1024)
    weight = module.weight.detach().clone()

    assert PageReleaser().release([module]) == 0
    assert torch.equal(module.weight, weight)


def manage(manager: ModelManager, path: Path, name: str) -> Mapped:
    return manager.load(ModelKey.for_file(path, name), lambda: Mapped(SafetensorsFile(path)))


def two_models(folder: Path) -> tuple[ModelManager, Mapped, Mapped]:
    """A manager holding two mapped models, a and b, neither used by a node yet."""
    manager = ModelManager(POLICY)
    models = []
    for seed, name in enumerate(("a", "b"), start=1):
        write_weights(folder / f"{name}.safetensors", seed=seed)
        models.append(manage(manager, folder / f"{name}.safetensors", name))
    manager.begin_node()
    return manager, models[0], models[1]


def test_a_node_using_one_model_lets_the_others_pages_go(tmp_path: Path) -> None:
    manager, model_a, model_b = two_models(tmp_path)
    read_all(model_a)
    manager.begin_node()

    read_all(model_b)

    assert resident(model_a) < PAGE * 4
    assert resident(model_b) >= 4 * 2**20 - 2 * PAGE


def test_models_used_by_the_same_node_stay_resident(tmp_path: Path) -> None:
    _, model_a, model_b = two_models(tmp_path)

    read_all(model_a)
    read_all(model_b)  # e.g. a ControlNet beside the UNet: both run every step

    assert resident(model_a) >= 4 * 2**20 - 2 * PAGE
    assert resident(model_b) >= 4 * 2**20 - 2 * PAGE


class CountingManager(ModelManager):
    def __init__(self) -> None:
        super().__init__(POLICY)
        self.nodes_begun = 0

    def begin_node(self) -> None:
        self.nodes_begun += 1
        super().begin_node()


def test_the_executor_tells_the_manager_when_each_node_starts(tmp_path: Path) -> None:
    from tests.model_engine import ModelEngine, node, probed

    engine = ModelEngine(tmp_path)
    engine.services.model_manager = counting = CountingManager()
    api = probed({"1": node("EmptyLatentImage", width=64, height=64, batch_size=1)}, "1")

    result, _ = engine.run(api)

    assert counting.nodes_begun == len(result.executed) == 2
