"""On a policy computing fp32 (a CPU without native bf16), the weights an fp16 file stores are
held as stored, views of the mapped file, and cast up layer by layer when they run: every
output equals that of the same file converted to fp32 at load, bit for bit, at half the memory.
The fp32 storage flags opt out; a LoRA or merge keeps the patched weights in fp32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from engine.diffusion.checkpoints.controlnet_loader import load_control_model
from engine.diffusion.checkpoints.controlnet_writer import random_controlnet
from engine.diffusion.checkpoints.loader import (
    LoadedCheckpoint,
    checkpoint_weight_bytes,
    load_checkpoint,
)
from engine.diffusion.checkpoints.safetensors_io import SafetensorsFile
from engine.diffusion.checkpoints.state_files import open_state_file
from engine.diffusion.checkpoints.writer import (
    random_checkpoint,
    write_random_checkpoint,
    write_tensors,
)
from engine.diffusion.memory import packed_conv
from engine.diffusion.memory.cast_on_use import Holding, casts_on_use, widens_exactly
from engine.diffusion.memory.devices import DevicePolicy
from engine.diffusion.memory.model_manager import ModelKey, ModelManager
from engine.diffusion.patches.patching import patched
from engine.diffusion.patches.weight_patches import MergePatch, MergeRule, WeightSource
from engine.diffusion.text.tokenizer import BpeCache
from tests.diffusion.controlnet_testing import control_inputs
from tests.model_engine import ModelEngine
from tests.test_lora_nodes import lora_node, run_workflow, sampled_workflow, write_lora

DEFAULT = DevicePolicy.decide(cuda_available=False, cpu_bf16=False)
CONVERTED = DevicePolicy.decide(cuda_available=False, cpu_bf16=False, fp32_unet=True,
                                fp32_text_enc=True, fp32_vae=True)
PARTS = {"unet": "model.diffusion_model.", "text": "cond_stage_model.transformer.text_model.",
         "vae": "first_stage_model."}


@pytest.fixture(scope="module")
def half_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("half") / "half.safetensors",
                                   "sd15", dtype=torch.float16)


def load(path: Path, policy: DevicePolicy) -> tuple[SafetensorsFile, LoadedCheckpoint]:
    opened = open_state_file(path)
    return opened.tensors, load_checkpoint(opened, policy, BpeCache().get())


def modules(loaded: LoadedCheckpoint) -> dict[str, nn.Module]:
    return {"unet": loaded.model.unet, "text": loaded.clip.encoders["l"],
            "vae": loaded.vae.module}


def unet_output(unet: nn.Module) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, unet.config.context_dim, generator=generator)
    return unet(x, torch.tensor([500.0]), context)


def test_only_dtypes_that_hold_every_value_widen_exactly() -> None:
    assert widens_exactly(torch.float16, torch.float32)
    assert widens_exactly(torch.bfloat16, torch.float32)
    assert widens_exactly(torch.float8_e4m3fn, torch.float16)
    assert not widens_exactly(torch.float16, torch.bfloat16)
    assert not widens_exactly(torch.float32, torch.float16)


def test_a_cpu_computing_fp32_holds_the_file_dtype_of_every_component_by_default() -> None:
    assert DEFAULT.file_dtype_held == {"unet", "text", "vae"}
    assert DEFAULT.unet_holding.dtype_for(torch.float16) == torch.float16
    assert DEFAULT.unet_holding.dtype_for(torch.float32) == torch.float32


@pytest.mark.parametrize(("flag", "part"), [("fp32_unet", "unet"), ("fp32_text_enc", "text"),
                                            ("fp32_vae", "vae")])
def test_each_fp32_storage_flag_opts_its_component_out(flag: str, part: str) -> None:
    policy = DevicePolicy.decide(cuda_available=False, cpu_bf16=False, **{flag: True})
    assert policy.file_dtype_held == {"unet", "text", "vae"} - {part}


def test_force_fp32_still_holds_the_file_dtype() -> None:
    policy = DevicePolicy.decide(cuda_available=False, cpu_bf16=False, force_fp32=True)
    assert policy.file_dtype_held == {"unet", "text", "vae"}


def test_an_fp16_checkpoint_is_held_as_the_mapped_file_by_default(half_file: Path) -> None:
    opened, loaded = load(half_file, DEFAULT)
    assert loaded.model.dtype == loaded.vae.dtype == torch.float32
    for part, module in modules(loaded).items():
        for name, value in module.named_parameters():
            assert value.dtype == torch.float16 and opened.holds(value), (part, name)


def test_the_fp32_flags_convert_every_weight(half_file: Path) -> None:
    _, loaded = load(half_file, CONVERTED)
    for module in modules(loaded).values():
        assert {p.dtype for p in module.parameters()} == {torch.float32}


def test_an_fp32_file_is_held_in_fp32_as_before(tmp_path: Path) -> None:
    path = write_random_checkpoint(tmp_path / "full.safetensors", "sd15", dtype=torch.float32)
    _, loaded = load(path, DEFAULT)
    for module in modules(loaded).values():
        assert {p.dtype for p in module.parameters()} == {torch.float32}


def test_a_held_unet_gives_the_converted_unets_numbers(half_file: Path) -> None:
    _, held = load(half_file, DEFAULT)
    _, wide = load(half_file, CONVERTED)
    assert torch.equal(unet_output(held.model.unet), unet_output(wide.model.unet))


def test_held_text_encoders_give_the_converted_numbers(half_file: Path) -> None:
    _, held = load(half_file, DEFAULT)
    _, wide = load(half_file, CONVERTED)
    ours, theirs = held.clip.encode("a red fox"), wide.clip.encode("a red fox")
    assert torch.equal(ours.cond, theirs.cond) and torch.equal(ours.pooled, theirs.pooled)


def test_a_held_vae_encodes_and_decodes_as_the_converted_one(half_file: Path) -> None:
    _, held = load(half_file, DEFAULT)
    _, wide = load(half_file, CONVERTED)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    latent = held.vae.encode(image)
    assert torch.equal(latent, wide.vae.encode(image))
    assert torch.equal(held.vae.decode(latent), wide.vae.decode(latent))


def test_a_mixed_file_holds_each_tensor_in_its_own_dtype(tmp_path: Path) -> None:
    tensors, metadata = random_checkpoint("sd15", dtype=torch.float32)
    mixed = {name: value.half() if ".output_blocks." in name else value
             for name, value in tensors.items()}
    path = write_tensors(tmp_path / "mixed.safetensors", mixed, metadata)
    _, held = load(path, DEFAULT)
    _, wide = load(path, CONVERTED)
    for name, value in held.model.unet.named_parameters():
        expected = torch.float16 if name.startswith("output_blocks.") else torch.float32
        assert value.dtype == expected, name
    assert torch.equal(unet_output(held.model.unet), unet_output(wide.model.unet))


def test_the_header_estimate_counts_the_held_dtype(half_file: Path) -> None:
    manager = ModelManager(DEFAULT)
    manager.load(ModelKey.for_file(half_file, "checkpoint"),
                 lambda: tuple(modules(load(half_file, DEFAULT)[1]).values()))
    estimate = checkpoint_weight_bytes(open_state_file(half_file), DEFAULT)
    assert estimate == manager.resident_bytes()
    assert estimate * 2 == checkpoint_weight_bytes(open_state_file(half_file), CONVERTED)


def test_an_evicted_held_model_reloads_held_with_the_same_output(half_file: Path) -> None:
    manager = ModelManager(DEFAULT)
    model = manager.load(ModelKey.for_file(half_file, "unet"),
                         lambda: load(half_file, DEFAULT)[1].model)
    before = unet_output(model.unet)
    manager.free()
    assert torch.equal(unet_output(model.unet), before)
    assert manager.reloads == 1
    assert {p.dtype for p in model.unet.parameters()} == {torch.float16}


def test_an_evicted_held_vae_reloads_before_its_layers_cast_up(half_file: Path) -> None:
    """VAE.decode calls the autoencoder's parts directly: the first hook to run is a part's, so
    the reload must come before that part's cast-up (else the cast misses the new weights)."""
    manager = ModelManager(DEFAULT)
    vae = manager.load(ModelKey.for_file(half_file, "vae"),
                       lambda: load(half_file, DEFAULT)[1].vae)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    before = vae.decode(latent)
    manager.free()
    assert torch.equal(vae.decode(latent), before)
    assert manager.reloads == 1


def lora_engine(base: Path, policy: DevicePolicy, source: Path) -> ModelEngine:
    """An engine over `base` with `source` as checkpoint "half.safetensors" and a LoRA."""
    engine = ModelEngine(base, policy)
    folder = engine.base / "models" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "half.safetensors").write_bytes(source.read_bytes())
    write_lora(engine, "style.safetensors", 1)
    return engine


def lora_workflow() -> dict[str, Any]:
    api = sampled_workflow("half.safetensors", ["10", 0], ["10", 1])
    api["10"] = lora_node("style.safetensors", ["1", 0], ["1", 1], 0.8, 0.7)
    return api


def test_a_whole_workflow_samples_the_same_latent_held_or_converted(
        tmp_path: Path, half_file: Path) -> None:
    api = sampled_workflow("half.safetensors", ["1", 0], ["1", 1])
    held = run_workflow(lora_engine(tmp_path / "held", DEFAULT, half_file), api)
    wide = run_workflow(lora_engine(tmp_path / "wide", CONVERTED, half_file), api)
    assert torch.equal(held[0], wide[0]) and torch.equal(held[1], wide[1])


def test_a_lora_on_a_held_model_gives_the_same_latent_as_on_the_converted_one(
        tmp_path: Path, half_file: Path) -> None:
    held_engine = lora_engine(tmp_path / "held", DEFAULT, half_file)
    held = run_workflow(held_engine, lora_workflow())
    wide = run_workflow(lora_engine(tmp_path / "wide", CONVERTED, half_file), lora_workflow())
    plain = run_workflow(held_engine, sampled_workflow("half.safetensors", ["1", 0], ["1", 1]))
    assert not torch.equal(held[1], plain[1])
    assert torch.equal(held[0], wide[0]) and torch.equal(held[1], wide[1])


def test_a_patched_held_weight_is_fp32_while_patched_and_the_file_view_after(
        half_file: Path, tmp_path: Path) -> None:
    opened, loaded = load(half_file, DEFAULT)
    _, other = load(write_random_checkpoint(tmp_path / "b.safetensors", "sd15", seed=5,
                                            dtype=torch.float16), DEFAULT)
    unet = loaded.model.unet
    merge = MergePatch(WeightSource(other.model.unet, ()), MergeRule((0.5, 0.5)))
    name = "input_blocks.1.1.proj_in.weight"
    with patched(unet, [merge]):
        assert unet.get_parameter(name).dtype == torch.float32
    assert unet.get_parameter(name).dtype == torch.float16
    assert opened.holds(unet.get_parameter(name))


def test_an_explicit_storage_flag_still_rounds_a_patched_weight_to_its_storage(
        half_file: Path) -> None:
    policy = DevicePolicy.decide(cuda_available=False, cpu_bf16=False, fp16_unet=True)
    _, loaded = load(half_file, policy)
    unet = loaded.model.unet
    merge = MergePatch(WeightSource.of(unet, (), unet), MergeRule((2.0, 0.0)))
    name = "input_blocks.1.1.proj_in.weight"
    with patched(unet, [merge]):
        assert unet.get_parameter(name).dtype == torch.float16


def test_a_held_conv_never_packs_its_per_call_cast_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packed_conv, "bf16_packing_supported", lambda: True)
    conv = packed_conv.Conv2d(4, 4, 3, padding=1).requires_grad_(False)
    Holding(torch.bfloat16, torch.float8_e4m3fn).apply(conv)
    seen = []
    conv.register_forward_pre_hook(lambda layer, _: seen.append(casts_on_use(layer)))
    conv(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16))
    assert seen == [True] and conv.derived_bytes() == 0


def test_a_held_controlnet_gives_the_converted_residuals(tmp_path: Path) -> None:
    tensors, metadata = random_controlnet()
    path = write_tensors(tmp_path / "cn.safetensors",
                         {name: value.half() for name, value in tensors.items()}, metadata)
    held = load_control_model(open_state_file(path), DEFAULT).network
    wide = load_control_model(open_state_file(path), CONVERTED).network
    assert {p.dtype for p in held.parameters()} == {torch.float16}
    assert {p.dtype for p in wide.parameters()} == {torch.float32}
    inputs = control_inputs(held.config)
    args = (inputs["x"], inputs["hint"], inputs["timesteps"], inputs["context"])
    ours, theirs = tree_leaves(held(*args)), tree_leaves(wide(*args))
    assert len(ours) == len(theirs) > 0
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
