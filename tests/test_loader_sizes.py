"""Every file loader tells the model manager, from the file's header, how many bytes its load
will keep, so under --model-ram-budget the least recently used models leave before a new one
is read, not after (checkpoints, UNet, VAE and text-encoder files alike)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import nodes.loaders
from engine.diffusion.checkpoints.writer import TINY_CLIP_L, random_checkpoint
from engine.diffusion.memory.devices import DevicePolicy
from engine.diffusion.memory.model_manager import ModelManager
from nodes.loaders import files_bytes
from tests.model_engine import ModelEngine, node, probed

POLICY = DevicePolicy.decide(cpu=True, force_fp32=True)


@dataclass(frozen=True)
class FileKind:
    """A loader node, the folder it reads and the checkpoint part its files hold."""

    node: str
    folder: str
    prefix: str  # the part's key prefix in a checkpoint
    keep_prefix: bool
    loader: str  # the function in nodes.loaders that reads the file
    inputs: dict[str, Any]
    tiny: dict[str, Any] = field(default_factory=dict)  # what the loader needs for tiny models

    def write(self, engine: ModelEngine, name: str, seed: int,
              dtype: torch.dtype | None = None) -> Path:
        tensors, metadata = random_checkpoint("sd15", seed=seed, dtype=dtype)
        part = {(key if self.keep_prefix else key[len(self.prefix):]): value.contiguous()
                for key, value in tensors.items() if key.startswith(self.prefix)}
        path = engine.base / "models" / self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(part, str(path), metadata=metadata)
        return path

    def run(self, engine: ModelEngine, name: str) -> None:
        name_input = next(key for key, value in self.inputs.items() if value is None)
        body = node(self.node, **{**self.inputs, name_input: name})
        engine.run(probed({"1": body}, "1"))


KINDS = (
    FileKind("UNETLoader", "diffusion_models", "model.diffusion_model.", True, "load_unet_file",
             {"unet_name": None, "weight_dtype": "default"}),
    FileKind("VAELoader", "vae", "first_stage_model.", False, "load_vae_file",
             {"vae_name": None}),
    FileKind("CLIPLoader", "text_encoders", "cond_stage_model.transformer.", False,
             "load_text_encoder_files", {"clip_name": None, "type": "stable_diffusion"},
             # a tiny CLIP-L is not recognised by its width: name its architecture and shape
             {"architectures": ["clip_l"], "configs": {"l": TINY_CLIP_L}}),
)


def models(engine: ModelEngine) -> ModelManager:
    return engine.services.model_manager


def observe_loads(kind: FileKind, engine: ModelEngine, monkeypatch: pytest.MonkeyPatch
                  ) -> list[int]:
    """The bytes the model manager holds each time the kind's loader starts reading a file."""
    resident_when_loading: list[int] = []
    load = getattr(nodes.loaders, kind.loader)

    def observed(*args: Any, **kwargs: Any) -> Any:
        resident_when_loading.append(models(engine).resident_bytes())
        return load(*args, **{**kwargs, **kind.tiny})

    monkeypatch.setattr(nodes.loaders, kind.loader, observed)
    return resident_when_loading


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.node)
def test_the_size_estimate_is_what_the_load_keeps(tmp_path: Path, kind: FileKind,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    engine = ModelEngine(tmp_path, POLICY)
    observe_loads(kind, engine, monkeypatch)
    path = kind.write(engine, "a.safetensors", seed=1)
    kind.run(engine, "a.safetensors")
    assert files_bytes([path], torch.float32) == models(engine).resident_bytes() > 0


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.node)
def test_a_second_file_under_the_budget_evicts_the_first_before_it_loads(
        tmp_path: Path, kind: FileKind, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = ModelEngine(tmp_path, POLICY)
    first = kind.write(engine, "a.safetensors", seed=1)
    kind.write(engine, "b.safetensors", seed=2)
    models(engine).ram_budget = files_bytes([first], torch.float32) + 1  # room for one
    resident_when_loading = observe_loads(kind, engine, monkeypatch)
    kind.run(engine, "a.safetensors")
    kind.run(engine, "b.safetensors")
    assert resident_when_loading == [0, 0]  # the first file's weights left before the read
    assert models(engine).resident_bytes() <= models(engine).ram_budget


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.node)
def test_an_fp16_file_held_as_stored_is_estimated_in_fp16(
        tmp_path: Path, kind: FileKind, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = ModelEngine(tmp_path, DevicePolicy.decide(cuda_available=False, cpu_bf16=False))
    observe_loads(kind, engine, monkeypatch)
    estimates: list[int] = []
    load = models(engine).load

    def load_with_size(key: Any, loader: Any, size: Any = None) -> Any:
        estimates.append(size())
        return load(key, loader, size)

    monkeypatch.setattr(models(engine), "load", load_with_size)
    path = kind.write(engine, "a.safetensors", seed=1, dtype=torch.float16)
    kind.run(engine, "a.safetensors")
    assert estimates == [models(engine).resident_bytes()] == [files_bytes([path], torch.float16)]
