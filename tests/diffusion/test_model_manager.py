"""The model manager keeps one copy per file, evicts by bytes under a budget and reloads
evicted models transparently when they are used again."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.diffusion.checkpoints.loader import load_checkpoint
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
