"""Helpers for the LoRA tests: tiny checkpoints loaded once, LoRA files written in the real key
naming, and the weights a handle sees while its patches are applied."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from engine.diffusion.checkpoints.addon_files import load_lora_file
from engine.diffusion.checkpoints.loader import LoadedCheckpoint, load_checkpoint
from engine.diffusion.checkpoints.state_files import open_state_file
from engine.diffusion.checkpoints.writer import write_random_checkpoint
from engine.diffusion.memory.devices import DevicePolicy
from engine.diffusion.patches.lora import LoraFile
from engine.diffusion.patches.patching import Patch, patched
from engine.diffusion.text.tokenizer import BpeCache

FP32 = DevicePolicy.decide(cpu=True, force_fp32=True)


def load_tiny(folder: Path, kind: str, seed: int = 0) -> LoadedCheckpoint:
    """A tiny random checkpoint of `kind`, written to `folder` and loaded in float32."""
    path = write_random_checkpoint(folder / f"{kind}_{seed}.safetensors", kind, seed=seed)
    return load_checkpoint(open_state_file(path), FP32, BpeCache().get())


def write_lora(folder: Path, tensors: Mapping[str, Tensor], name: str = "lora") -> LoraFile:
    """Save `tensors` as a .safetensors LoRA and parse it back the way the loader node does."""
    path = folder / f"{name}.safetensors"
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return load_lora_file(path)


def randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def state_copy(module: nn.Module) -> dict[str, Tensor]:
    return {name: tensor.clone() for name, tensor in module.state_dict().items()}


def weights_under(module: nn.Module, patches: Sequence[Patch], *names: str) -> list[Tensor]:
    """Copies of the named parameters while `patches` are applied."""
    with patched(module, patches):
        return [module.get_parameter(name).detach().clone() for name in names]


def assert_state_equal(module: nn.Module, expected: Mapping[str, Tensor]) -> None:
    """Every tensor of the module bit for bit equal to `expected`."""
    current = module.state_dict()
    assert current.keys() == expected.keys()
    changed = [name for name, tensor in current.items() if not torch.equal(tensor, expected[name])]
    assert not changed, f"{len(changed)} tensors differ after unpatching, e.g. {changed[:3]}"
