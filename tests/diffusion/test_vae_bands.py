"""The VAE's row bands (vae_bands.py): the plain path's numbers with bounded temporaries.

Banded convs sum in another order than the whole-tensor conv only where oneDNN picks another
kernel for the band's shape (it does for the tiny shapes here; at full size the bands measured
bit-exact), so results are checked against the plain fp32 path with a bound: each path is an
fp32 rounding of the same math, so their difference stays within twice the plain path's own
rounding error, measured against the same model in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.diffusion.memory.cast_on_use import compute_in
from engine.diffusion.networks import vae as vae_module
from engine.diffusion.networks.vae import AutoencoderKL, ResnetBlock, VAEConfig
from engine.diffusion.networks.vae_bands import (
    BandPlan,
    NormAffine,
    pad_downsample_conv,
    upsample_conv,
)
from engine.diffusion.networks.vae_model import VAE
from tests.diffusion.test_vae import TINY_F8, randomized

TWO_LEVELS = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=2)  # a 32 -> 64 channel shortcut
ALWAYS = 0  # threshold: band every layer, however small
ONE_ROW = 1  # band_bytes: one row per band
FEW_ROWS = 100_000  # band_bytes: a few rows per band at these widths (uneven last band)


def assert_within_rounding(banded: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor) -> None:
    plain_error = (plain.double() - exact).abs().max().item()
    assert (banded - plain).abs().max().item() <= 2 * plain_error


def with_bands(model: AutoencoderKL, band_bytes: int) -> AutoencoderKL:
    banded = copy.deepcopy(model)
    banded.bands = BandPlan(threshold_bytes=ALWAYS, band_bytes=band_bytes)
    return banded


@pytest.mark.parametrize("band_bytes", [ONE_ROW, FEW_ROWS])
@pytest.mark.parametrize("config", [TINY_F8, TWO_LEVELS], ids=["f8", "two_levels"])
def test_banded_decode_is_the_plain_decode_within_fp32_rounding(config, band_bytes) -> None:
    model = randomized(config)
    latent = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(1))  # odd sizes
    with torch.no_grad():
        plain = model.decode(latent)
        banded = with_bands(model, band_bytes).decode(latent)
        exact = copy.deepcopy(model).double().decode(latent.double())
    assert_within_rounding(banded, plain, exact)


@pytest.mark.parametrize("band_bytes", [ONE_ROW, FEW_ROWS])
@pytest.mark.parametrize("config", [TINY_F8, TWO_LEVELS], ids=["f8", "two_levels"])
def test_banded_encode_is_the_plain_encode_within_fp32_rounding(config, band_bytes) -> None:
    model = randomized(config)
    size = (5 * config.downscale, 7 * config.downscale)
    pixels = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        plain = model.encode_moments(pixels)
        banded = with_bands(model, band_bytes).encode_moments(pixels)
        exact = copy.deepcopy(model).double().encode_moments(pixels.double())
    assert_within_rounding(banded, plain, exact)


@pytest.mark.parametrize("slab_bytes", [1, 10**9])
def test_group_norm_statistics_and_scaling_are_torchs_bit_for_bit(slab_bytes: int) -> None:
    generator = torch.Generator().manual_seed(3)
    norm = nn.GroupNorm(8, 32, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(32, generator=generator))
        norm.bias.copy_(0.1 * torch.randn(32, generator=generator))
        x = torch.randn(3, 32, 9, 13, generator=generator) * 3 + 1
        out = torch.empty_like(x)
        NormAffine.of(norm, x, slab_bytes).silu_into(x, out)
        assert torch.equal(out, F.silu(norm(x)))


def test_upsample_conv_in_bands_is_upsample_then_conv() -> None:
    conv = nn.Conv2d(16, 8, 3, padding=1)
    x = torch.randn(2, 16, 7, 5, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        banded = upsample_conv(conv, x, BandPlan(ALWAYS, ONE_ROW))
        exact = conv.double()(F.interpolate(x.double(), scale_factor=2.0, mode="nearest"))
    assert banded.shape == (2, 8, 14, 10)
    assert_within_rounding(banded, plain, exact)


@pytest.mark.parametrize("height", [6, 7])
def test_downsample_in_bands_pads_right_and_bottom_then_strides_two(height: int) -> None:
    conv = nn.Conv2d(16, 16, 3, stride=2)
    x = torch.randn(2, 16, height, 9, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = conv(F.pad(x, (0, 1, 0, 1)))
        banded = pad_downsample_conv(conv, x, BandPlan(ALWAYS, ONE_ROW))
        exact = conv.double()(F.pad(x.double(), (0, 1, 0, 1)))
    assert banded.shape == plain.shape
    assert_within_rounding(banded, plain, exact)


def test_bands_cover_every_row_once_in_order() -> None:
    spans = list(BandPlan(band_bytes=300).spans(rows=10, row_bytes=100))
    assert spans == [(0, 3), (3, 6), (6, 9), (9, 10)]


def test_band_height_comes_from_the_memory_bound_and_is_at_least_one_row() -> None:
    plan = BandPlan(band_bytes=64 * 2**20)
    assert next(plan.spans(rows=4096, row_bytes=2**20)) == (0, 64)
    assert next(plan.spans(rows=4096, row_bytes=2**30)) == (0, 1)


def test_only_tensors_over_the_threshold_are_banded() -> None:
    plan, conv, x = BandPlan(threshold_bytes=1000), nn.Conv2d(4, 4, 3), torch.zeros(1, 4, 8, 8)
    with torch.no_grad():
        assert plan.applies(x, 1001, conv)
        assert not plan.applies(x, 1000, conv)


def test_bands_are_not_used_where_they_would_change_the_numbers_or_the_graph() -> None:
    plan, conv, x = BandPlan(threshold_bytes=ALWAYS), nn.Conv2d(4, 4, 3), torch.zeros(1, 4, 8, 8)
    assert not plan.applies(x, 10**9, conv)  # gradients recorded: the bands write in place
    with torch.no_grad():
        assert not plan.applies(x.double(), 10**9, conv)
        assert not plan.applies(x.transpose(2, 3), 10**9, conv)
        conv.register_forward_pre_hook(lambda *_: None)  # e.g. a streamed layer
        assert not plan.applies(x, 10**9, conv)


def test_residual_block_in_bands_keeps_its_input_and_returns_a_new_tensor() -> None:
    block = ResnetBlock(32, 64, TWO_LEVELS)
    x = torch.randn(1, 32, 6, 6, generator=torch.Generator().manual_seed(6))
    before = x.clone()
    with torch.no_grad():
        out = block(x, BandPlan(ALWAYS, ONE_ROW))
    assert torch.equal(x, before) and out.shape == (1, 64, 6, 6)


def count_banded_blocks(monkeypatch) -> list[int]:
    calls: list[int] = []
    banded_resnet = vae_module.norm_silu_conv_add_

    def counting(*args, **kwargs):
        calls.append(1)
        return banded_resnet(*args, **kwargs)

    monkeypatch.setattr(vae_module, "norm_silu_conv_add_", counting)
    return calls


def test_the_vae_wrapper_and_tiled_decode_run_the_bands(monkeypatch) -> None:
    calls = count_banded_blocks(monkeypatch)
    vae = VAE(with_bands(randomized(TINY_F8), FEW_ROWS), latent_scale=0.18215)
    latent = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(7))
    vae.decode(latent)
    decoded = len(calls)
    vae.decode_tiled(latent, tile_size=32, overlap=8)
    assert decoded > 0 and len(calls) > decoded


def test_a_vae_held_in_fp16_runs_its_bands_with_the_weights_cast_up(monkeypatch) -> None:
    calls = count_banded_blocks(monkeypatch)
    model = randomized(TINY_F8).half()
    exact = copy.deepcopy(model).double()
    compute_in(model, torch.float32)  # a 16-bit file held as stored, computed in fp32
    latent = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        plain = model.decode(latent)
        model.bands = BandPlan(threshold_bytes=ALWAYS, band_bytes=FEW_ROWS)
        banded = model.decode(latent)
        reference = exact.decode(latent.double())
    assert calls and all(p.dtype == torch.float16 for p in model.parameters())
    assert_within_rounding(banded, plain, reference)
