"""Checkpoint layout detection from keys and shapes, and zero-copy safetensors reading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.diffusion.checkpoints.detect import (
    V_PRED_PROBE,
    UnknownLayoutError,
    detect_checkpoint,
    detect_unet_file,
)
from engine.diffusion.checkpoints.safetensors_io import SafetensorsError, SafetensorsFile
from tests.diffusion.manifests import meta_state

EXPECTED = {
    "sd15": ("sd1", 4, "eps", 0.18215, {"clip_l"}),
    "sd15_inpaint": ("sd1", 9, "eps", 0.18215, {"clip_l"}),
    "sd21v": ("sd2", 4, "v", 0.18215, {"clip_h"}),
    "sdxl_base": ("sdxl", 4, "eps", 0.13025, {"clip_l", "clip_g"}),
    "sdxl_refiner": ("sdxl_refiner", 4, "eps", 0.13025, {"clip_g"}),
    "sd_x4_upscaler": ("sd_x4", 7, "v", 0.08333, {"clip_h"}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_reference_layout_is_detected(name: str) -> None:
    state = meta_state(name)
    if name == "sd21v":  # the real 768-v probe bias is wide (tests/data/formats/README.md)
        state["model.diffusion_model." + V_PRED_PROBE] = torch.randn(320) * 0.2
    layout = detect_checkpoint(state)
    family, channels, prediction, scale, encoders = EXPECTED[name]
    assert (layout.family, layout.in_channels, layout.prediction) == (family, channels,
                                                                      prediction)
    assert layout.latent_scale == scale and set(layout.text_prefixes) == encoders
    assert layout.vae_prefix == "first_stage_model."


def test_sd2_with_a_narrow_probe_bias_is_eps() -> None:
    state = meta_state("sd21v")
    state["model.diffusion_model." + V_PRED_PROBE] = torch.zeros(320)
    assert detect_checkpoint(state).prediction == "eps"


def test_v_pred_marker_keys_win() -> None:
    state = meta_state("sd15")
    state["v_pred"], state["ztsnr"] = torch.empty(0), torch.empty(0)
    layout = detect_checkpoint(state)
    assert layout.prediction == "v" and layout.zsnr


def test_an_sdxl_edm_vpred_marker_means_v_prediction_on_its_sigma_range() -> None:
    state = meta_state("sdxl_base")
    state["edm_vpred.sigma_max"] = torch.tensor(120.0)
    state["edm_vpred.sigma_min"] = torch.tensor(0.002)
    layout = detect_checkpoint(state)
    assert layout.prediction == "v"
    assert layout.edm_sigmas == pytest.approx((0.002, 120.0))


def test_an_edm_vpred_marker_without_a_minimum_takes_edms_0_002() -> None:
    state = meta_state("sdxl_base")
    state["edm_vpred.sigma_max"] = torch.tensor(80.0)
    assert detect_checkpoint(state).edm_sigmas == pytest.approx((0.002, 80.0))


def test_a_checkpoint_without_the_edm_marker_has_no_edm_range() -> None:
    assert detect_checkpoint(meta_state("sdxl_base")).edm_sigmas is None


def test_old_sd1_merge_without_text_model_segment() -> None:
    state = {key.replace("transformer.text_model.", "transformer."): value
             for key, value in meta_state("sd15").items()}
    assert detect_checkpoint(state).text_prefixes == {"clip_l": "cond_stage_model.transformer."}


def test_standalone_unet_file_without_prefix() -> None:
    state = {key[len("model.diffusion_model."):]: value for key, value in
             meta_state("sdxl_base").items() if key.startswith("model.diffusion_model.")}
    layout = detect_unet_file(state)
    assert layout.family == "sdxl" and layout.unet_prefix == ""


def test_unknown_layout_names_what_was_found() -> None:
    state = {"foo.bar.weight": torch.empty(3, device="meta"),
             "model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, 5, 3, 3,
                                                                          device="meta")}
    with pytest.raises(UnknownLayoutError) as caught:
        detect_checkpoint(state)
    message = str(caught.value)
    assert "5 input channels" in message and "320 model channels" in message
    assert "foo.bar.*" in message


def test_file_without_unet_is_refused_clearly() -> None:
    with pytest.raises(UnknownLayoutError, match="no UNet found"):
        detect_checkpoint({"first_stage_model.encoder.conv_in.weight": torch.empty(1)})


def test_safetensors_file_is_read_lazily_and_exactly(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.uint8),
               "c": torch.randn(2).half(), "d": torch.tensor(3.0), "e": torch.randn(7).bfloat16()}
    path = tmp_path / "x.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    opened = SafetensorsFile(path)
    assert opened.metadata == {"format": "pt"} and set(opened) == set(tensors)
    assert opened.shape("a") == (3, 4)
    for name, tensor in tensors.items():
        assert torch.equal(opened[name], tensor) and opened[name].dtype == tensor.dtype


def test_damaged_safetensors_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(SafetensorsError, match="broken.safetensors"):
        SafetensorsFile(path)
    truncated = tmp_path / "short.safetensors"
    save_file({"a": torch.randn(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:-50])
    with pytest.raises(SafetensorsError, match="outside the file"):
        SafetensorsFile(truncated)
