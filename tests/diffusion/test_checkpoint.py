"""The random-checkpoint writer reproduces the real layouts; checkpoints load into working
handles; pickle files are refused unless allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.diffusion.checkpoints.detect import detect_checkpoint
from engine.diffusion.checkpoints.loader import load_checkpoint, load_unet_file, load_vae_file
from engine.diffusion.checkpoints.safetensors_io import DTYPES
from engine.diffusion.checkpoints.state_files import CheckpointError, open_state_file
from engine.diffusion.checkpoints.writer import KINDS, random_checkpoint, write_random_checkpoint
from engine.diffusion.memory.devices import DevicePolicy
from engine.diffusion.text.tokenizer import BpeCache
from tests.diffusion.manifests import manifest

NAMES = {dtype: name for name, dtype in DTYPES.items()}
FP32 = DevicePolicy.decide(cpu=True, force_fp32=True)


@pytest.fixture(scope="module")
def bpe():
    return BpeCache().get()


# No unCLIP, CosXL edit or Lotus manifest (the edit model is checked against SDXL base's
# below, Lotus in test_image_conditioned_models.py).
RECORDED_KINDS = [kind for kind in KINDS if kind not in ("sd21_unclip_h", "sdxl_edit",
                                                         "lotus_d")]
CHECKPOINT_KINDS = [kind for kind in KINDS if kind != "lotus_d"]  # lotus_d is a UNet file


@pytest.mark.parametrize("kind", RECORDED_KINDS)
def test_full_size_writer_matches_the_reference_layout_exactly(kind: str) -> None:
    tensors, _ = random_checkpoint(kind, tiny=False, meta=True)
    ours = {name: (NAMES[t.dtype], tuple(t.shape)) for name, t in tensors.items()}
    reference = manifest(kind)
    assert set(ours) == set(reference), (sorted(set(ours) - set(reference))[:5],
                                         sorted(set(reference) - set(ours))[:5])
    mismatched = {name: (ours[name], reference[name]) for name in ours
                  if ours[name] != reference[name]}
    assert not mismatched, list(mismatched.items())[:5]


def test_full_size_edit_writer_is_sdxl_base_with_8_input_channels_and_the_edm_marker() -> None:
    tensors, _ = random_checkpoint("sdxl_edit", tiny=False, meta=True)
    reference = manifest("sdxl_base")
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    assert set(tensors) - set(reference) == {"edm_vpred.sigma_min", "edm_vpred.sigma_max"}
    assert set(reference) - set(tensors) == set()
    assert tuple(tensors[conv_in].shape) == (320, 8, 3, 3)
    assert all(tuple(tensors[name].shape) == reference[name][1] for name in reference
               if name != conv_in)


@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_tiny_checkpoint_is_detected_and_loads(kind: str, tmp_path: Path, bpe) -> None:
    path = write_random_checkpoint(tmp_path / f"{kind}.safetensors", kind)
    opened = open_state_file(path)
    loaded = load_checkpoint(opened, FP32, bpe)
    expected_family = {"sd15": "sd1", "sd15_inpaint": "sd1", "sd21v": "sd2",
                       "sd21_unclip_h": "sd2", "sdxl_base": "sdxl",
                       "sdxl_refiner": "sdxl_refiner", "sdxl_edit": "sdxl",
                       "sd_x4_upscaler": "sd_x4"}[kind]
    assert loaded.layout.family == expected_family
    assert loaded.layout.prediction == ("v" if kind.startswith(("sd21", "sd_x4"))
                                        or kind == "sdxl_edit" else "eps")
    channels = {"sd15_inpaint": 9, "sdxl_edit": 8, "sd_x4_upscaler": 7}.get(kind, 4)
    assert loaded.model.in_channels == channels
    encoded = loaded.clip.encode("a photo of a cat")
    assert encoded.cond.shape[-1] == loaded.model.config.context_dim
    latent = torch.randn(1, 4, 8, 8)
    image = loaded.vae.decode(latent)
    side = 8 * loaded.vae.downscale
    assert image.shape == (1, side, side, 3) and 0 <= image.min() and image.max() <= 1
    x = torch.randn(1, loaded.model.in_channels, 8, 8)
    y = None
    if loaded.model.config.adm_in_channels:
        y = torch.zeros(1, loaded.model.config.adm_in_channels)
    elif loaded.model.config.num_classes:
        y = torch.tensor([20])
    out = loaded.model.unet(x, torch.tensor([500.0]), encoded.cond, y)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_weights_are_not_copied_when_dtypes_match(tmp_path: Path, bpe) -> None:
    path = write_random_checkpoint(tmp_path / "sd15.safetensors", "sd15")
    opened = open_state_file(path)
    loaded = load_checkpoint(opened, FP32, bpe, with_clip=False, with_vae=False)
    weight = loaded.model.unet.input_blocks[0][0].weight
    source = opened.tensors["model.diffusion_model.input_blocks.0.0.weight"]
    assert weight.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()


def test_writer_is_deterministic(tmp_path: Path) -> None:
    first, _ = random_checkpoint("sd15", seed=3)
    second, _ = random_checkpoint("sd15", seed=3)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_standalone_unet_and_vae_files(tmp_path: Path) -> None:
    tensors, metadata = random_checkpoint("sd15")
    unet_only = {k[len("model.diffusion_model."):]: v for k, v in tensors.items()
                 if k.startswith("model.diffusion_model.")}
    vae_only = {k: v for k, v in tensors.items() if k.startswith("first_stage_model.")}
    from safetensors.torch import save_file

    save_file(unet_only, str(tmp_path / "unet.safetensors"), metadata=metadata)
    save_file(vae_only, str(tmp_path / "vae.safetensors"))
    model = load_unet_file(open_state_file(tmp_path / "unet.safetensors"), FP32)
    assert model.family == "sd1"
    vae = load_vae_file(open_state_file(tmp_path / "vae.safetensors"), FP32)
    assert vae.decode(torch.zeros(1, 4, 4, 4)).shape == (1, 32, 32, 3)


def test_pickle_checkpoint_is_refused_without_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    tensors, _ = random_checkpoint("sd15")
    torch.save({"state_dict": tensors}, path)
    with pytest.raises(CheckpointError, match="pickle"):
        open_state_file(path)
    opened = open_state_file(path, allow_pickle=True)
    assert detect_checkpoint(opened.tensors).family == "sd1"


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": Payload()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        open_state_file(path, allow_pickle=True)


def test_unknown_file_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown model file type"):
        open_state_file(path)


def test_an_edit_checkpoint_samples_on_its_continuous_edm_v_schedule(tmp_path: Path,
                                                                        bpe) -> None:
    path = write_random_checkpoint(tmp_path / "cosxl_edit.safetensors", "sdxl_edit")
    sampling = load_checkpoint(open_state_file(path), FP32, bpe, with_clip=False,
                               with_vae=False).model.sampling
    assert sampling.prediction == "v_prediction"
    assert (float(sampling.sigma_min), float(sampling.sigma_max)) == \
        pytest.approx((0.002, 120.0))
    assert float(sampling.timestep(torch.tensor(1.0))) == 0.0  # EDM's ln(sigma) / 4
