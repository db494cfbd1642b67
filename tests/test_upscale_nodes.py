"""Upscale-model nodes through spandrel: tiny random models of several architectures, written
in their real key layouts by the project's writer, are detected with their scale, run in tiles,
and load from .safetensors (and .pth only with the pickle opt-in)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.diffusion.checkpoints.addon_files import read_upscale_state
from engine.diffusion.checkpoints.state_files import CheckpointError
from engine.diffusion.checkpoints.writer import UPSCALER_KINDS, random_upscaler
from engine.diffusion.networks.upscalers import UpscaleModelError, build_upscaler
from nodes.upscale import UpscaleModel, upscale_pixels
from tests.model_engine import ModelEngine, node, probed

CPU = torch.device("cpu")
# kind -> (spandrel's architecture name, scale) of the writer's tiny models
EXPECTED = {"esrgan": ("ESRGAN", 4), "compact": ("RealESRGAN Compact", 2), "span": ("SPAN", 2),
            "swinir": ("SwinIR", 2), "hat": ("HAT", 2), "dat": ("DAT", 2),
            "omnisr": ("OmniSR", 2)}


def loaded(kind: str, seed: int = 0) -> UpscaleModel:
    net = build_upscaler(random_upscaler(kind, seed), kind, torch.float32, CPU)
    return UpscaleModel(net, net.scale, torch.float32, kind)


def test_the_writer_covers_every_architecture_tested() -> None:
    assert set(UPSCALER_KINDS) == set(EXPECTED)


@pytest.mark.parametrize("kind", UPSCALER_KINDS)
def test_each_architecture_is_detected_with_its_scale(kind: str) -> None:
    model = loaded(kind)
    assert (model.net.architecture, model.scale) == EXPECTED[kind]
    out = model.net(torch.rand(1, 3, 10, 9))
    assert out.shape == (1, 3, 10 * model.scale, 9 * model.scale)


@pytest.mark.parametrize("kind", ["compact", "swinir"])
def test_tiled_upscale_is_close_to_untiled(kind: str) -> None:
    model = loaded(kind)
    pixels = torch.rand(1, 3, 40, 36)
    whole = upscale_pixels(model, pixels, tile=64, overlap=8)
    calls: list[tuple[int, int]] = []
    tiled = upscale_pixels(model, pixels, tile=24, overlap=12,
                           progress=lambda done, total: calls.append((done, total)))
    assert calls == [(done, 6) for done in range(1, 7)]  # 3 rows x 2 columns
    assert tiled.shape == whole.shape == (1, 3, 80, 72)
    # the tiles see zero padding at their edges, so seams differ a little, never grossly
    difference = (tiled - whole).abs()
    assert difference.mean() < 0.05 * whole.std()


def test_safetensors_and_pth_files_give_the_same_model(tmp_path: Path) -> None:
    state = random_upscaler("esrgan")
    save_file(state, tmp_path / "x4.safetensors")
    torch.save({"params_ema": state}, tmp_path / "x4.pth")  # Real-ESRGAN's wrapper
    pixels = torch.rand(1, 3, 6, 5)
    outputs = [build_upscaler(read_upscale_state(path, allow_pickle=True), path.name,
                              torch.float32, CPU)(pixels)
               for path in (tmp_path / "x4.safetensors", tmp_path / "x4.pth")]
    assert torch.equal(outputs[0], outputs[1])


def test_data_parallel_prefixes_of_swin_models_are_stripped() -> None:
    state = {f"module.{key}": value for key, value in random_upscaler("swinir").items()}
    assert build_upscaler(state, "dp.pth", torch.float32, CPU).architecture == "SwinIR"


def test_a_file_spandrel_does_not_know_is_refused_naming_its_keys() -> None:
    with pytest.raises(UpscaleModelError, match="no architecture.*'a.weight'"):
        build_upscaler({"a.weight": torch.zeros(1)}, "mystery", torch.float32, CPU)


def test_pth_files_are_refused_unless_pickles_are_allowed(tmp_path: Path) -> None:
    torch.save(random_upscaler("compact"), tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="--allow-pickle-checkpoints"):
        read_upscale_state(tmp_path / "model.pth")


def test_pth_files_are_loaded_without_running_code(tmp_path: Path) -> None:
    evil = {"params_ema": random_upscaler("compact"), "payload": NotWeights()}
    torch.save(evil, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        read_upscale_state(tmp_path / "evil.pth", allow_pickle=True)


class NotWeights:
    """Any class: unpickling it would run code, so weights_only loading must refuse it."""


@pytest.mark.parametrize("kind", ["esrgan", "span", "hat"])
def test_upscale_nodes_run_through_the_engine(tmp_path: Path, kind: str) -> None:
    engine = ModelEngine(tmp_path)
    folder = engine.base / "models" / "upscale_models"
    folder.mkdir(parents=True)
    save_file(random_upscaler(kind), folder / f"tiny_{kind}.safetensors")
    api = {"1": node("UpscaleModelLoader", model_name=f"tiny_{kind}.safetensors"),
           "2": node("EmptyImage", width=24, height=16, batch_size=2, color=0x336699),
           "3": node("ImageUpscaleWithModel", upscale_model=["1", 0], image=["2", 0])}
    result, _ = engine.run(probed(api, "3"))
    upscaled = result.values["3"][0][0]
    scale = EXPECTED[kind][1]
    assert upscaled.shape == (2, 16 * scale, 24 * scale, 3)
    assert upscaled.min() >= 0.0 and upscaled.max() <= 1.0


def test_spandrel_import_leaves_no_torchvision_stand_in_behind() -> None:
    """Where torchvision cannot be imported, the stand-in exists only while spandrel imports,
    so other importers (transformers, custom-node packs) see the environment as it is."""
    import importlib.util
    import sys

    from engine.diffusion.networks.upscalers import import_spandrel

    import_spandrel()
    if importlib.util.find_spec("torchvision") is None:
        assert not [name for name in sys.modules if name.split(".")[0] == "torchvision"]
