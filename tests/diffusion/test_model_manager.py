"""The model manager keeps one copy per file, evicts by bytes under a budget and reloads
evicted models transparently when they are used again."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from engine.diffusion.checkpoints.loader import checkpoint_weight_bytes, load_checkpoint
from engine.diffusion.checkpoints.state_files import open_state_file
from engine.diffusion.checkpoints.writer import write_random_checkpoint
from engine.diffusion.memory.devices import DevicePolicy
from engine.diffusion.memory.model_manager import ModelKey, ModelManager
from engine.diffusion.patches.patching import patched
from engine.diffusion.text.tokenizer import BpeCache

POLICY = DevicePolicy.decide(cpu=True, force_fp32=True)


def checkpoint_loader(manager: ModelManager, path: Path):
    def load():
        loaded = load_checkpoint(open_state_file(path), POLICY, BpeCache().get())
        return loaded.model, loaded.clip, loaded.vae
    return load


def load(manager: ModelManager, path: Path):
    return manager.load(ModelKey.for_file(path, "checkpoint"), checkpoint_loader(manager, path))


def unet_output(model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, model.config.context_dim, generator=generator)
    return model.unet(x, torch.tensor([500.0]), context)


def test_same_file_is_loaded_once(tmp_path: Path) -> None:
    manager = ModelManager(POLICY)
    path = write_random_checkpoint(tmp_path / "a.safetensors", "sd15")
    assert load(manager, path) is load(manager, path)
    assert manager.loads == 1


def test_budget_evicts_least_recently_used_and_reloads_transparently(tmp_path: Path) -> None:
    probe = ModelManager(POLICY)
    first_path = write_random_checkpoint(tmp_path / "a.safetensors", "sd15", seed=1)
    second_path = write_random_checkpoint(tmp_path / "b.safetensors", "sd15", seed=2)
    one_model = load(probe, first_path)
    budget = probe.resident_bytes() + 1  # room for one checkpoint, not two
    manager = ModelManager(POLICY, ram_budget=budget)
    model_a, clip_a, _ = load(manager, first_path)
    expected = unet_output(model_a)
    load(manager, second_path)
    stats = manager.stats()
    assert stats["evicted"] == ["a.safetensors:checkpoint"]
    assert manager.resident_bytes() <= budget
    assert model_a.unet.input_blocks[0][0].weight.device.type == "meta"
    again = unet_output(model_a)  # the forward hook reloads it; b is evicted in turn
    assert torch.equal(again, expected)
    assert manager.reloads == 1
    assert manager.stats()["evicted"] == ["b.safetensors:checkpoint"]
    assert clip_a.encode("a cat").cond.shape[-1] == 64
    del one_model


def test_patching_an_evicted_model_reloads_it_first(tmp_path: Path) -> None:
    manager = ModelManager(POLICY, ram_budget=1)
    model, _, _ = load(manager, write_random_checkpoint(tmp_path / "a.safetensors", "sd15"))
    other = write_random_checkpoint(tmp_path / "b.safetensors", "sd15", seed=5)
    load(manager, other)
    assert model.unet.input_blocks[0][0].weight.device.type == "meta"

    class AddOne:
        def apply(self, module):
            weight = module.input_blocks[0][0].weight
            original = weight.detach().clone()
            with torch.no_grad():
                weight.add_(1.0)
            return lambda: weight.data.copy_(original)

    with patched(model.unet, [AddOne()]) as unet:
        assert unet.input_blocks[0][0].weight.device.type == "cpu"


def test_free_unloads_models_and_stats_count_bytes(tmp_path: Path) -> None:
    manager = ModelManager(POLICY)
    load(manager, write_random_checkpoint(tmp_path / "a.safetensors", "sd15"))
    stats = manager.stats()
    assert stats["bytes_by_device"]["cpu"] == manager.resident_bytes() > 0
    manager.free()
    assert manager.stats()["loaded"] == []


def test_a_load_under_the_budget_evicts_others_before_the_loader_runs(tmp_path: Path) -> None:
    first_path = write_random_checkpoint(tmp_path / "a.safetensors", "sd15", seed=1)
    second_path = write_random_checkpoint(tmp_path / "b.safetensors", "sd15", seed=2)
    size = checkpoint_weight_bytes(open_state_file(second_path), POLICY)
    manager = ModelManager(POLICY, ram_budget=size + 1)  # room for one checkpoint, not two
    model_a, _, _ = load(manager, first_path)
    seen_when_loading = []

    def load_second():
        seen_when_loading.append(model_a.unet.input_blocks[0][0].weight.device.type)
        return checkpoint_loader(manager, second_path)()

    manager.load(ModelKey.for_file(second_path, "checkpoint"), load_second, lambda: size)
    assert seen_when_loading == ["meta"]
    assert manager.resident_bytes() <= manager.ram_budget


def test_the_size_estimate_of_a_checkpoint_is_what_loading_it_keeps(tmp_path: Path) -> None:
    path = write_random_checkpoint(tmp_path / "a.safetensors", "sdxl_base")
    manager = ModelManager(POLICY)
    load(manager, path)
    assert checkpoint_weight_bytes(open_state_file(path), POLICY) == manager.resident_bytes()


class Derived(torch.nn.Linear):
    """A layer holding a derived copy of its weight, as a packed conv does."""

    def derived_bytes(self) -> int:
        return 1000


def test_copies_derived_from_the_weights_count_in_the_budget() -> None:
    manager = ModelManager(POLICY)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    derived = torch.nn.Sequential(Derived(4, 4))
    manager.load(ModelKey("plain", 0, 0, "m"), lambda: plain)
    before = manager.resident_bytes()
    manager.load(ModelKey("derived", 0, 0, "m"), lambda: derived)
    assert manager.resident_bytes() == 2 * before + 1000


def test_reloading_an_evicted_model_evicts_others_first(tmp_path: Path, caplog) -> None:
    first_path = write_random_checkpoint(tmp_path / "a.safetensors", "sd15", seed=1)
    second_path = write_random_checkpoint(tmp_path / "b.safetensors", "sd15", seed=2)
    size = checkpoint_weight_bytes(open_state_file(first_path), POLICY)
    manager = ModelManager(POLICY, ram_budget=size + 1)
    model_a, _, _ = load(manager, first_path)
    load(manager, second_path)
    with caplog.at_level(logging.INFO, logger="loom.models"):
        unet_output(model_a)
    assert [record.getMessage().split(" (")[0] for record in caplog.records] == [
        "evicted b.safetensors:checkpoint", "reloaded a.safetensors:checkpoint"]
