"""Upscale-model nodes: ESRGAN RRDBNet files in the BasicSR and original layouts load to the
same network; upscaling is tiled like ComfyUI's and runs through the engine."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.diffusion.checkpoints.addon_files import read_upscale_state
from engine.diffusion.checkpoints.state_files import CheckpointError
from engine.diffusion.networks.esrgan import RRDBConfig, RRDBNet, UpscaleModelError, build_rrdbnet
from nodes.upscale import UpscaleModel, upscale_pixels
from tests.model_engine import ModelEngine, node, probed

TINY = RRDBConfig(nf=8, gc=4, num_blocks=1)


def random_state(config: RRDBConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random RRDBNet state dict in the BasicSR layout, scaled so outputs stay informative."""
    torch.manual_seed(seed)
    net = RRDBNet(config)
    return {key: (value * 0.5).contiguous() for key, value in net.state_dict().items()}


def old_layout(state: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """BasicSR names renamed to the original ESRGAN sequential layout (x4: model.3/6/8/10)."""
    fixed = {"conv_first": "model.0", "conv_body": f"model.1.sub.{blocks}",
             "conv_up1": "model.3", "conv_up2": "model.6", "conv_hr": "model.8",
             "conv_last": "model.10"}
    renamed = {}
    for key, tensor in state.items():
        module, _, kind = key.rpartition(".")
        if match := re.fullmatch(r"body\.(\d+)\.rdb(\d)\.conv(\d)", module):
            block, rdb, conv = match.groups()
            renamed[f"model.1.sub.{block}.RDB{rdb}.conv{conv}.0.{kind}"] = tensor
        else:
            renamed[f"{fixed[module]}.{kind}"] = tensor
    return renamed


def as_model(net: RRDBNet) -> UpscaleModel:
    return UpscaleModel(net, net.config.scale, torch.float32, "tiny")


def test_old_and_new_layout_files_give_identical_outputs(tmp_path: Path) -> None:
    state = random_state(TINY)
    save_file(state, tmp_path / "new.safetensors")
    torch.save(old_layout(state, TINY.num_blocks), tmp_path / "old.pth")
    new = build_rrdbnet(read_upscale_state(tmp_path / "new.safetensors"), "new")
    old = build_rrdbnet(read_upscale_state(tmp_path / "old.pth", allow_pickle=True), "old")
    assert new.config == old.config == TINY
    pixels = torch.rand(1, 3, 6, 5)
    assert torch.equal(new(pixels), old(pixels))


def test_real_esrgan_params_ema_wrapper_is_unwrapped(tmp_path: Path) -> None:
    torch.save({"params_ema": random_state(TINY)}, tmp_path / "wrapped.pth")
    state = read_upscale_state(tmp_path / "wrapped.pth", allow_pickle=True)
    assert build_rrdbnet(state, "w").config == TINY


@pytest.mark.parametrize("unshuffle, scale", [(1, 4), (2, 2), (4, 1)])
def test_output_size_is_input_times_detected_scale(unshuffle: int, scale: int) -> None:
    config = RRDBConfig(nf=8, gc=4, num_blocks=1, unshuffle=unshuffle)
    net = build_rrdbnet(random_state(config), "tiny")
    assert net.config == config and net.config.scale == scale
    assert net(torch.rand(2, 3, 7, 5)).shape == (2, 3, 7 * scale, 5 * scale)


def test_tiled_upscale_matches_untiled() -> None:
    model = as_model(build_rrdbnet(random_state(TINY), "tiny"))
    pixels = torch.rand(1, 3, 40, 36)
    whole = upscale_pixels(model, pixels, tile=64, overlap=8)
    calls: list[tuple[int, int]] = []
    tiled = upscale_pixels(model, pixels, tile=24, overlap=12,
                           progress=lambda done, total: calls.append((done, total)))
    assert calls == [(done, 6) for done in range(1, 7)]  # 3 rows x 2 columns
    # RRDBNet's receptive field exceeds the overlap, so seams differ slightly, never grossly
    assert tiled.shape == whole.shape == (1, 3, 160, 144)
    difference = (tiled - whole).abs()
    assert difference.max() < 0.1 * whole.std() and difference.mean() < 0.01 * whole.std()


def test_foreign_architecture_is_refused_with_its_name(tmp_path: Path) -> None:
    swinir = {"conv_first.weight": torch.zeros(8, 3, 3, 3),
              "layers.0.residual_group.blocks.0.attn.qkv.weight": torch.zeros(24, 8)}
    save_file(swinir, tmp_path / "swinir.safetensors")
    with pytest.raises(UpscaleModelError, match="SwinIR.*only ESRGAN / RRDBNet"):
        build_rrdbnet(read_upscale_state(tmp_path / "swinir.safetensors"), "swinir")


def test_pth_files_are_refused_unless_pickles_are_allowed(tmp_path: Path) -> None:
    torch.save(random_state(TINY), tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="--allow-pickle-checkpoints"):
        read_upscale_state(tmp_path / "model.pth")


def test_pth_files_are_loaded_without_running_code(tmp_path: Path) -> None:
    evil = {"params_ema": random_state(TINY), "payload": NotWeights()}
    torch.save(evil, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        read_upscale_state(tmp_path / "evil.pth", allow_pickle=True)


class NotWeights:
    """Any class: unpickling it would run code, so weights_only loading must refuse it."""


def test_unknown_file_lists_its_keys() -> None:
    with pytest.raises(UpscaleModelError, match="no ESRGAN/RRDBNet keys.*'a.weight'"):
        build_rrdbnet({"a.weight": torch.zeros(1)}, "mystery")


def test_upscale_nodes_run_through_the_engine(tmp_path: Path) -> None:
    engine = ModelEngine(tmp_path)
    engine.services.model_manager.allow_pickle = True  # as --allow-pickle-checkpoints sets it
    folder = engine.base / "models" / "upscale_models"
    folder.mkdir(parents=True)
    torch.save(old_layout(random_state(TINY), TINY.num_blocks), folder / "tiny_x4.pth")
    api = {"1": node("UpscaleModelLoader", model_name="tiny_x4.pth"),
           "2": node("EmptyImage", width=24, height=16, batch_size=2, color=0x336699),
           "3": node("ImageUpscaleWithModel", upscale_model=["1", 0], image=["2", 0])}
    result, listener = engine.run(probed(api, "3"))
    upscaled = result.values["3"][0][0]
    assert upscaled.shape == (2, 64, 96, 3)
    assert upscaled.min() >= 0.0 and upscaled.max() <= 1.0
    progress = [(data["value"], data["max"]) for name, data in listener.events
                if name == "progress" and data["node"] == "3"]
    assert progress == [(1, 1)]
