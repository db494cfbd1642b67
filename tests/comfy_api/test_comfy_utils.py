"""comfy.utils and comfy.model_management over Loom's services."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from engine.context import ExecutionInterrupted
from tests.model_engine import ModelEngine


def test_load_torch_file_reads_safetensors(bound: ModelEngine) -> None:
    import comfy.utils
    path = bound.base / "weights.safetensors"
    save_file({"w": torch.arange(4.0)}, str(path))
    assert torch.equal(comfy.utils.load_torch_file(str(path))["w"], torch.arange(4.0))


def test_load_torch_file_refuses_pickle_without_the_opt_in(bound: ModelEngine) -> None:
    import comfy.utils
    path = bound.base / "weights.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="--allow-pickle-checkpoints"):
        comfy.utils.load_torch_file(str(path))


def test_interrupting_through_model_management_stops_with_looms_interrupt(
        bound: ModelEngine) -> None:
    import comfy.model_management as mm
    mm.interrupt_current_processing(True)
    try:
        assert mm.processing_interrupted()
        with pytest.raises(ExecutionInterrupted):
            mm.throw_exception_if_processing_interrupted()
    finally:
        mm.interrupt_current_processing(False)
    assert not bound.executor.interrupt.is_set()


def test_devices_and_dtypes_follow_the_device_policy(bound: ModelEngine) -> None:
    import comfy.model_management as mm
    policy = bound.services.model_manager.policy
    assert mm.get_torch_device() == policy.device
    assert mm.unet_dtype() == policy.unet_dtype and mm.vae_dtype() == policy.vae_dtype
    assert mm.get_free_memory() > 0


def test_tiled_scale_blends_tiles_into_the_whole(bound: ModelEngine) -> None:
    import comfy.utils
    samples = torch.rand(1, 3, 32, 32)
    out = comfy.utils.tiled_scale(samples, lambda tile: tile.repeat_interleave(2, -1)
                                  .repeat_interleave(2, -2), tile_x=16, tile_y=16, overlap=4,
                                  upscale_amount=2, out_channels=3)
    expected = samples.repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert torch.allclose(out, expected, atol=1e-5)
