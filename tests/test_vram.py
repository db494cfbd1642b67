"""The model manager's VRAM budget: least recently used models are offloaded to fit, models too
big for the budget are loaded partially with their other layers streamed per forward, and
outputs and patching are exactly those of fully resident models.

On the CPU the compute and offload devices are both the CPU and a probe stands in for the
GPU's memory; placement is read from each layer's recorded state, not from tensor devices."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from engine.diffusion.checkpoints.controlnet_writer import write_random_controlnet
from engine.diffusion.checkpoints.loader import load_checkpoint
from engine.diffusion.checkpoints.state_files import open_state_file
from engine.diffusion.checkpoints.writer import write_random_checkpoint
from engine.diffusion.memory.cast_on_use import compute_in
from engine.diffusion.memory.devices import DevicePolicy
from engine.diffusion.memory.model_manager import ModelKey, ModelManager
from engine.diffusion.memory.offload import (
    GB,
    INFERENCE_RESERVE,
    LayerState,
    MemoryInfo,
    Placement,
    VramMode,
    VramSettings,
    compute_device,
    cuda_memory_probe,
    reserve_bytes,
)
from engine.diffusion.patches.lora import apply_lora
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.patches.patching import patched
from engine.diffusion.text.tokenizer import BpeCache
from main import build_parser
from tests.diffusion.lora_testing import assert_state_equal, state_copy, write_lora
from tests.diffusion.test_lora_patching import full_lora
from tests.model_engine import ModelEngine, node, probed
from web.routes_system import system_stats

CPU = DevicePolicy.decide(cpu=True, force_fp32=True)
LAYER_BYTES = (8 * 8 + 8) * 4  # one Linear(8, 8) in float32
MLP_BYTES = 4 * LAYER_BYTES


def gpu(total: int, mode: VramMode = VramMode.NORMAL, smart_memory: bool = True
        ) -> VramSettings:
    """A pretend GPU of `total` bytes, all of it for weights."""
    return VramSettings(lambda: MemoryInfo(total, total // 2), mode, reserve=0,
                        smart_memory=smart_memory)


def mlp(seed: int = 0) -> nn.Sequential:
    generator = torch.Generator().manual_seed(seed)
    layers = nn.Sequential(*(nn.Linear(8, 8) for _ in range(4))).requires_grad_(False)
    for param in layers.parameters():
        param.copy_(torch.randn(param.shape, generator=generator))
    return layers.eval()


def load_mlp(manager: ModelManager, name: str, seed: int = 0) -> nn.Sequential:
    return manager.load(ModelKey(name, 0, 0, "mlp"), lambda: mlp(seed))


def placement(manager: ModelManager, name: str) -> Placement:
    return next(p for e in manager.entries() if e.key.path == name for p in e.placements)


def states(manager: ModelManager) -> dict[str, str]:
    return {entry.key.path: entry.placements[0].describe()["state"]
            for entry in manager.entries()}


X = torch.randn(2, 8, generator=torch.Generator().manual_seed(7))


# -- the budget --------------------------------------------------------------------------------

def test_least_recently_used_models_are_offloaded_to_fit_the_budget() -> None:
    manager = ModelManager(CPU, vram=gpu(2 * MLP_BYTES))
    a, b, c = (load_mlp(manager, name) for name in "abc")
    assert states(manager) == {"a": "offloaded", "b": "offloaded", "c": "offloaded"}
    a(X), b(X)
    assert states(manager) == {"a": "loaded", "b": "loaded", "c": "offloaded"}
    c(X)
    assert states(manager) == {"a": "offloaded", "b": "loaded", "c": "loaded"}
    b(X), a(X)  # c is now the least recently used
    assert states(manager) == {"a": "loaded", "b": "loaded", "c": "offloaded"}
    assert manager.stats()["vram"]["used"] == 2 * MLP_BYTES


def test_a_model_held_by_a_running_block_is_not_offloaded() -> None:
    free = ModelManager(CPU, vram=gpu(MLP_BYTES))
    a, b = load_mlp(free, "a"), load_mlp(free, "b", seed=1)
    a(X), b(X)
    assert states(free) == {"a": "offloaded", "b": "loaded"}
    held = ModelManager(CPU, vram=gpu(MLP_BYTES))
    a, b = load_mlp(held, "a"), load_mlp(held, "b", seed=1)
    with patched(a, []):  # as a sampler holds the UNet while a ControlNet runs
        b(X)
        assert states(held) == {"a": "loaded", "b": "partial"}


def test_highvram_never_offloads() -> None:
    manager = ModelManager(CPU, vram=gpu(MLP_BYTES, VramMode.HIGH))
    for name in "ab":
        load_mlp(manager, name)(X)
    assert states(manager) == {"a": "loaded", "b": "loaded"}


def test_without_smart_memory_other_models_are_offloaded_even_when_they_fit() -> None:
    manager = ModelManager(CPU, vram=gpu(10 * MLP_BYTES, smart_memory=False))
    a, b = load_mlp(manager, "a"), load_mlp(manager, "b")
    a(X), b(X)
    assert states(manager) == {"a": "offloaded", "b": "loaded"}


def test_reserve_vram_arithmetic() -> None:
    assert reserve_bytes(None) == 400 * 2**20 + INFERENCE_RESERVE
    assert reserve_bytes(1.5) == int(1.5 * GB) + int(0.8 * GB)
    with pytest.raises(ValueError, match="--reserve-vram must be >= 0"):
        reserve_bytes(-1)
    probe = lambda: MemoryInfo(8 * GB, 8 * GB)  # noqa: E731
    reserve = reserve_bytes(2.0)
    assert VramSettings(probe, reserve=reserve).budget() == 8 * GB - reserve
    assert VramSettings(probe, VramMode.LOW, reserve).budget() == int((8 * GB - reserve) / 1.3)
    assert VramSettings(probe, VramMode.NO, reserve).budget() == 0
    assert VramSettings(lambda: MemoryInfo(GB, GB), reserve=reserve).budget() == 0


def test_flags_become_vram_settings() -> None:
    _, run = build_parser()
    probe = lambda: MemoryInfo(GB, GB)  # noqa: E731
    args = run.parse_args(["w.json", "--lowvram", "--reserve-vram", "1", "--disable-smart-memory"])
    settings = VramSettings.from_args(args, probe)
    assert (settings.mode, settings.reserve, settings.smart_memory) == (
        VramMode.LOW, GB + INFERENCE_RESERVE, False)
    assert VramSettings.from_args(run.parse_args(["w.json"]), probe).mode is VramMode.NORMAL
    assert VramSettings.from_args(run.parse_args(["w.json", "--gpu-only"]),
                                  probe).mode is VramMode.GPU_ONLY
    with pytest.raises(SystemExit):
        run.parse_args(["w.json", "--lowvram", "--novram"])


def test_gpu_only_loads_weights_where_they_compute() -> None:
    args = argparse.Namespace(cpu=True, gpu_only=True)
    policy = DevicePolicy.from_args(args)
    assert policy.offload_device == policy.device
    assert DevicePolicy.decide(cpu=True).offload_device == torch.device("cpu")


# -- partial loading ---------------------------------------------------------------------------

def test_a_model_bigger_than_the_budget_keeps_the_first_layers_and_streams_the_rest() -> None:
    reference = mlp()(X)
    manager = ModelManager(CPU, vram=gpu(int(2.5 * LAYER_BYTES)))
    model = load_mlp(manager, "a")
    assert torch.equal(model(X), reference)
    place = placement(manager, "a")
    assert [place.state_of(layer) for layer in model] == [LayerState.RESIDENT] * 2 + [
        LayerState.STREAMED] * 2
    assert place.bytes_on_compute == 2 * LAYER_BYTES
    assert place.streamed_bytes == 2 * LAYER_BYTES  # copied in once per forward
    assert torch.equal(model(X), reference)
    assert place.streamed_bytes == 4 * LAYER_BYTES


def test_streamed_layers_are_copied_in_for_their_forward_and_dropped_after() -> None:
    manager = ModelManager(CPU, vram=gpu(MLP_BYTES, VramMode.NO))
    model = load_mlp(manager, "a")
    resting = [layer.weight.data_ptr() for layer in model]
    place = placement(manager, "a")
    during = []
    model[2].register_forward_hook(lambda *_: during.append(place.streamed_copies))
    model(X)
    assert during == [1] and place.streamed_copies == 0
    assert [layer.weight.data_ptr() for layer in model] == resting


def test_a_streamed_layer_held_in_fp16_is_cast_after_its_copy_and_rests_in_fp16() -> None:
    def held() -> nn.Sequential:
        model = mlp().half()
        compute_in(model, torch.float32)
        return model

    reference = mlp().half().float()(X)
    manager = ModelManager(CPU, vram=gpu(MLP_BYTES, VramMode.NO))
    model = manager.load(ModelKey("held", 0, 0, "mlp"), held)
    resting = [layer.weight.data_ptr() for layer in model]
    assert torch.equal(model(X), reference)
    assert [layer.weight.data_ptr() for layer in model] == resting
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_a_forward_that_raises_still_drops_its_copies() -> None:
    manager = ModelManager(CPU, vram=gpu(MLP_BYTES, VramMode.NO))
    model = load_mlp(manager, "a")
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5))
    assert placement(manager, "a").streamed_copies == 0


def test_offloading_gives_back_the_resting_tensors() -> None:
    manager = ModelManager(CPU, vram=gpu(MLP_BYTES))
    a, b = load_mlp(manager, "a"), load_mlp(manager, "b")
    resting = [layer.weight.data_ptr() for layer in a]
    a(X), b(X)
    assert states(manager) == {"a": "offloaded", "b": "loaded"}
    assert [layer.weight.data_ptr() for layer in a] == resting


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("vram") / "sd15.safetensors", "sd15")


def load_unet(manager: ModelManager, path: Path) -> ModelHandle:
    def loader() -> ModelHandle:
        loaded = load_checkpoint(open_state_file(path), manager.policy, BpeCache().get(),
                                 with_clip=False, with_vae=False)
        assert loaded.model is not None
        return loaded.model

    return manager.load(ModelKey.for_file(path, "unet"), loader)


def unet_output(model: ModelHandle) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=generator).to(model.device)
    context = torch.randn(1, 77, model.config.context_dim, generator=generator).to(model.device)
    with torch.no_grad():
        return model.unet(x, torch.tensor([500.0], device=model.device), context)


@pytest.mark.parametrize("mode", [VramMode.LOW, VramMode.NO])
def test_partially_loaded_unet_gives_the_resident_output_exactly(sd15: Path,
                                                                 mode: VramMode) -> None:
    expected = unet_output(load_unet(ModelManager(CPU), sd15))
    probe = ModelManager(CPU, vram=gpu(GB))
    load_unet(probe, sd15)
    half = placement(probe, str(sd15.resolve())).total_bytes // 2
    manager = ModelManager(CPU, vram=gpu(half, mode))
    model = load_unet(manager, sd15)
    assert torch.equal(unet_output(model), expected)
    place = placement(manager, str(sd15.resolve()))
    layers = [m for m in model.unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    layer_states = {place.state_of(layer) for layer in layers}
    if mode is VramMode.NO:
        assert layer_states == {LayerState.STREAMED}
    else:
        assert layer_states == {LayerState.RESIDENT, LayerState.STREAMED}
        assert 0 < place.bytes_on_compute <= int(half / 1.3)
    assert place.streamed_bytes > 0


def test_lora_on_a_streamed_unet_patches_what_is_streamed_and_unpatches_bit_for_bit(
        sd15: Path, tmp_path: Path) -> None:
    plain = load_unet(ModelManager(CPU), sd15)
    lora = write_lora(tmp_path, full_lora(plain.unet, 0))
    plain_patched, _, _ = apply_lora(plain, None, lora, 0.8, 0.0)
    with patched(plain.unet, plain_patched.patches):
        expected = unet_output(plain_patched)
    manager = ModelManager(CPU, vram=gpu(GB, VramMode.NO))
    model = load_unet(manager, sd15)
    before = state_copy(model.unet)
    resting = {name: param.data_ptr() for name, param in model.unet.named_parameters()}
    lora_model, _, _ = apply_lora(model, None, lora, 0.8, 0.0)
    with patched(model.unet, lora_model.patches):
        output = unet_output(lora_model)
    assert torch.equal(output, expected)
    assert not torch.equal(output, unet_output(model))
    assert_state_equal(model.unet, before)
    assert all(param.data_ptr() == resting[name] for name, param in model.unet.named_parameters())


def txt2img_with_controlnet() -> dict[str, Any]:
    api = {"ckpt": node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors"),
           "pos": node("CLIPTextEncode", text="a house by a lake", clip=["ckpt", 1]),
           "neg": node("CLIPTextEncode", text="blurry", clip=["ckpt", 1]),
           "empty": node("EmptyLatentImage", width=64, height=64, batch_size=1),
           "hint": node("LoadImage", image="edges.png"),
           "cn": node("ControlNetLoader", control_net_name="canny.safetensors"),
           "apply": node("ControlNetApplyAdvanced", positive=["pos", 0], negative=["neg", 0],
                         control_net=["cn", 0], image=["hint", 0], strength=1.0,
                         start_percent=0.0, end_percent=1.0)}
    api["sample"] = node("KSampler", model=["ckpt", 0], seed=7, steps=2, cfg=5.0,
                         sampler_name="euler", scheduler="normal", positive=["apply", 0],
                         negative=["apply", 1], latent_image=["empty", 0], denoise=1.0)
    api["decode"] = node("VAEDecode", samples=["sample", 0], vae=["ckpt", 2])
    return probed(api, "decode")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("workflow")
    write_random_checkpoint(base / "models" / "checkpoints" / "tiny_sd15.safetensors", "sd15")
    write_random_controlnet(base / "models" / "controlnet" / "canny.safetensors", seed=1)
    (base / "input").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(base / "input" / "edges.png")
    return base


def run_image(base: Path, vram: VramSettings | None) -> tuple[Tensor, ModelManager]:
    engine = ModelEngine(base)
    manager = ModelManager(CPU, vram=vram)
    engine.services.model_manager = manager
    result, _ = engine.run(txt2img_with_controlnet())
    return result.values["decode"][0][0], manager


@pytest.fixture(scope="module")
def resident_image(model_folder: Path) -> Tensor:
    return run_image(model_folder, None)[0]


@pytest.mark.parametrize("mode", [VramMode.NORMAL, VramMode.NO])
def test_a_controlnet_workflow_under_a_small_budget_gives_the_same_image(
        model_folder: Path, resident_image: Tensor, mode: VramMode) -> None:
    path = model_folder / "models" / "checkpoints" / "tiny_sd15.safetensors"
    unet = load_unet(ModelManager(CPU), path).unet
    budget = sum(t.numel() * t.element_size() for t in unet.state_dict().values()) // 2
    image, manager = run_image(model_folder, gpu(budget, mode))
    assert torch.equal(image, resident_image)
    placements = [p for entry in manager.entries() for p in entry.placements]
    assert {p.name.split("/")[-1] for p in placements} == {
        "UNet", "ClipTextModel", "AutoencoderKL", "ControlNet"}
    assert all(p.streamed_bytes > 0 for p in placements if p.total_bytes > budget)
    assert manager.stats()["vram"]["used"] <= budget or mode is VramMode.NO


# -- figures, free, devices --------------------------------------------------------------------

def test_stats_count_weights_per_device_and_the_budget() -> None:
    manager = ModelManager(CPU, vram=gpu(int(2.5 * LAYER_BYTES)))
    load_mlp(manager, "a")(X)
    stats = manager.stats()
    assert stats["bytes_by_device"] == {"cpu": MLP_BYTES}
    vram = stats["vram"]
    assert (vram["mode"], vram["total"], vram["free"], vram["reserve"], vram["budget"]) == (
        "normalvram", int(2.5 * LAYER_BYTES), int(2.5 * LAYER_BYTES) // 2, 0,
        int(2.5 * LAYER_BYTES))
    assert vram["used"] == 2 * LAYER_BYTES
    assert vram["models"] == [{"name": "a:mlp/Sequential", "state": "partial",
                               "bytes": MLP_BYTES, "bytes_on_compute": 2 * LAYER_BYTES,
                               "streamed_layers": 2}]
    assert ModelManager(CPU).stats()["vram"] is None


def test_system_stats_carry_the_vram_figures() -> None:
    manager = ModelManager(CPU, vram=gpu(GB))
    stats = system_stats(argparse.Namespace(cpu=True), manager)
    assert stats["loom_models"]["vram"]["budget"] == GB
    assert {"vram_total", "vram_free", "torch_vram_total", "torch_vram_free"} <= set(
        stats["devices"][0])


def test_free_releases_every_model_and_a_later_use_reloads_it() -> None:
    manager = ModelManager(CPU, vram=gpu(GB))
    model = load_mlp(manager, "a")
    expected = model(X)
    manager.free()
    assert states(manager) == {"a": "offloaded"}
    assert manager.stats()["loaded"] == [] and model[0].weight.device.type == "meta"
    assert torch.equal(model(X), expected)
    assert manager.reloads == 1 and states(manager) == {"a": "loaded"}


def test_compute_device_is_the_managers_for_managed_modules() -> None:
    manager = ModelManager(CPU, vram=gpu(GB))
    model = load_mlp(manager, "a")
    manager.free()  # weights are meta tensors now; the module still computes on the CPU
    assert compute_device(model) == torch.device("cpu")
    assert compute_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")


# -- CUDA --------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", [VramMode.LOW, VramMode.NO])
def test_partial_loading_on_cuda_matches_the_resident_model_and_the_cpu(
        sd15: Path, mode: VramMode) -> None:
    cuda = DevicePolicy(torch.device("cuda"), torch.float32, torch.float32, torch.float32)
    on_cpu = unet_output(load_unet(ModelManager(CPU), sd15))

    def output_under(settings: VramSettings) -> tuple[Tensor, Placement]:
        manager = ModelManager(cuda, vram=settings)
        model = load_unet(manager, sd15)
        assert (model.device.type, model.unet.out["2"].weight.device.type) == ("cuda", "cpu")
        return unet_output(model), manager.entries()[0].placements[0]

    resident, _ = output_under(gpu(GB))
    size = ModelManager(CPU, vram=gpu(GB))
    load_unet(size, sd15)
    half = size.entries()[0].placements[0].total_bytes // 2
    partial, place = output_under(gpu(half, mode))
    assert place.streamed_layers > 0
    assert torch.equal(partial, resident)
    # cuDNN convolutions may run in TF32: the CPU comparison is approximate
    torch.testing.assert_close(partial.cpu(), on_cpu, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cuda_probe_reports_the_gpu_and_the_default_manager_manages_it() -> None:
    info = cuda_memory_probe(torch.device("cuda"))()
    assert 0 < info.free <= info.total
    cuda = DevicePolicy(torch.device("cuda"), torch.float16, torch.float16, torch.float32)
    manager = ModelManager(cuda)
    assert manager.vram is not None and manager.memory_info() is not None
    assert manager.stats()["vram"]["budget"] == info.total - reserve_bytes(None)
