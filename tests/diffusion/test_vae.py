"""KL-f8 VAE: checkpoint layout, parity with diffusers on identical random weights, key
conversion, the node-facing `VAE` wrapper and tiled encode/decode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.diffusion.networks.tiling import blend_weights, tile_starts, tiled_apply
from engine.diffusion.networks.vae import (
    AttnBlock,
    AutoencoderKL,
    VAEConfig,
    vae_state_dict_from_any,
)
from engine.diffusion.networks.vae_model import VAE, crop_to_multiple, latent_scale_for
from tests.diffusion.manifests import manifest
from tests.numerics import rel_err

PREFIX = "first_stage_model."
# a 4-level (downscale 8) model as small as GroupNorm(32) allows, for the wrapper and tiling
TINY_F8 = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)


def randomized(config: VAEConfig, seed: int = 0) -> AutoencoderKL:
    """A model whose every parameter (norms and biases too) holds non-trivial random values."""
    model = AutoencoderKL(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if ".norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(noise / param[0].numel() ** 0.5)  # unit-variance activations
    return model.eval()


def diffusers_twin(model: AutoencoderKL):
    """diffusers' AutoencoderKL holding `model`'s weights, converted by diffusers' own
    single-file converter from the checkpoint layout (`first_stage_model.*`)."""
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    config = model.config
    ddconfig = {
        "ch": config.ch,
        "ch_mult": list(config.ch_mult),
        "num_res_blocks": config.num_res_blocks,
        "in_channels": config.in_channels,
        "out_ch": config.out_channels,
        "z_channels": config.z_channels,
    }
    original = {"model": {"params": {"first_stage_config": {"params": {"ddconfig": ddconfig}}}}}
    checkpoint = {PREFIX + k: v for k, v in model.state_dict().items()}
    diffusers_config = single_file.create_vae_diffusers_config_from_ldm(original, checkpoint)
    twin = DiffusersAutoencoderKL(**diffusers_config)
    weights = single_file.convert_ldm_vae_checkpoint(checkpoint, diffusers_config)
    twin.load_state_dict(weights, strict=True)
    return twin.eval()


def assert_parity_with_diffusers(model: AutoencoderKL, pixels: torch.Tensor) -> None:
    twin = diffusers_twin(model)
    with torch.no_grad():
        ours_mean = model.encode_mean(pixels)
        ours_moments = model.encode_moments(pixels)
        latent = torch.randn(ours_mean.shape, generator=torch.Generator().manual_seed(3))
        ours_image = model.decode(latent)
        posterior = twin.encode(pixels).latent_dist
        reference_image = twin.decode(latent).sample
    assert rel_err(ours_mean, posterior.mean) <= 1e-4
    assert rel_err(ours_moments, posterior.parameters) <= 1e-4
    assert rel_err(ours_image, reference_image) <= 1e-4


# ---- layout -------------------------------------------------------------------------------


def checkpoint_vae_shapes(name: str) -> dict[str, tuple[int, ...]]:
    return {key: shape for key, (_dtype, shape) in manifest(name).items()
            if key.startswith(PREFIX)}


@pytest.mark.parametrize("tsv", ["sd15", "sd21v", "sdxl_base"])
def test_full_size_keys_and_shapes_equal_the_checkpoint_vae(tsv: str) -> None:
    with torch.device("meta"):
        model = AutoencoderKL(VAEConfig())
    ours = {PREFIX + k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == checkpoint_vae_shapes(tsv)


def test_config_is_read_back_from_state_dict_shapes() -> None:
    for config in (VAEConfig(), VAEConfig.tiny(), TINY_F8):
        with torch.device("meta"):
            state = AutoencoderKL(config).state_dict()
        assert VAEConfig.from_state_dict(state) == config


def test_downsampling_pads_right_and_bottom_then_strides_two() -> None:
    model = randomized(VAEConfig.tiny())
    down = model.encoder.down[0].downsample
    x = torch.randn(1, 32, 6, 6)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    assert torch.equal(down(x), expected)
    assert down(x).shape == (1, 32, 3, 3)


# ---- parity with diffusers ------------------------------------------------------------------


def test_tiny_encoder_and_decoder_match_diffusers() -> None:
    model = randomized(VAEConfig.tiny())
    pixels = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert_parity_with_diffusers(model, pixels)


@pytest.mark.slow
def test_full_size_encoder_and_decoder_match_diffusers() -> None:
    model = randomized(VAEConfig())
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert_parity_with_diffusers(model, pixels)


# ---- key conversion -----------------------------------------------------------------------


def test_diffusers_state_dict_converts_to_our_weights() -> None:
    model = randomized(VAEConfig.tiny())
    diffusers_sd = diffusers_twin(model).state_dict()
    converted = vae_state_dict_from_any(diffusers_sd)
    ours = model.state_dict()
    assert converted.keys() == ours.keys()
    assert all(torch.equal(converted[k], ours[k]) for k in ours)


def test_old_diffusers_attention_names_and_vae_prefix_are_accepted() -> None:
    model = randomized(VAEConfig.tiny())
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old_style = {}
    for key, tensor in diffusers_twin(model).state_dict().items():
        for new, old in renames.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        old_style["vae." + key] = tensor
    converted = vae_state_dict_from_any(old_style)
    assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())


def test_checkpoint_keeps_only_first_stage_tensors() -> None:
    ours = randomized(VAEConfig.tiny()).state_dict()
    checkpoint = {PREFIX + k: v for k, v in ours.items()}
    checkpoint["model.diffusion_model.out.2.weight"] = torch.zeros(4, 320, 3, 3)
    checkpoint["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
    assert vae_state_dict_from_any(checkpoint).keys() == ours.keys()


def test_linear_attention_weights_become_1x1_conv_views() -> None:
    ours = randomized(VAEConfig.tiny()).state_dict()
    key = "decoder.mid.attn_1.q.weight"
    flat = dict(ours, **{key: ours[key].flatten(1)})  # (C, C, 1, 1) -> (C, C)
    converted = vae_state_dict_from_any(flat)
    assert converted[key].shape == ours[key].shape
    assert converted[key].data_ptr() == flat[key].data_ptr()  # no copy


def test_unknown_tensor_names_are_reported_with_examples() -> None:
    state = randomized(VAEConfig.tiny()).state_dict()
    state["encoder.mystery_layer.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="mystery_layer"):
        vae_state_dict_from_any(state)


def test_meta_build_with_assign_keeps_the_callers_tensors() -> None:
    checkpoint = {PREFIX + k: v for k, v in randomized(VAEConfig.tiny()).state_dict().items()}
    vae = VAE.from_state_dict(checkpoint, family="sd1")
    loaded = vae.module.decoder.conv_out.weight
    assert loaded.data_ptr() == checkpoint[PREFIX + "decoder.conv_out.weight"].data_ptr()
    assert not any(p.is_meta for p in vae.module.parameters())


# ---- the VAE wrapper ----------------------------------------------------------------------


def tiny_vae(**kwargs) -> VAE:
    return VAE(randomized(TINY_F8), latent_scale=latent_scale_for("sd1"), **kwargs)


def test_latent_scale_by_family() -> None:
    assert latent_scale_for("sd1") == latent_scale_for("sd2") == 0.18215
    assert latent_scale_for("sdxl") == 0.13025
    with pytest.raises(ValueError, match="sd3"):
        latent_scale_for("sd3")


def test_encode_returns_the_scaled_posterior_mean_deterministically() -> None:
    vae = tiny_vae()
    image = torch.rand(2, 32, 24, 3, generator=torch.Generator().manual_seed(2))
    latent = vae.encode(image)
    with torch.no_grad():
        mean = vae.module.encode_mean(image.movedim(-1, 1) * 2 - 1)
    assert latent.shape == (2, 4, 4, 3)
    assert torch.allclose(latent, mean * 0.18215, rtol=1e-6, atol=1e-7)
    assert torch.equal(vae.encode(image), latent)


def test_decode_unscales_and_maps_to_a_clamped_channels_last_image() -> None:
    vae = tiny_vae()
    latent = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(4))
    image = vae.decode(latent)
    with torch.no_grad():
        raw = vae.module.decode(latent / 0.18215)
    assert image.shape == (2, 24, 40, 3)
    assert torch.allclose(image, ((raw + 1) / 2).clamp(0, 1).movedim(1, -1), atol=1e-6)
    assert image.min() >= 0 and image.max() <= 1


def test_sdxl_scale_is_applied_on_both_sides() -> None:
    sd1, sdxl = tiny_vae(), VAE(randomized(TINY_F8), latent_scale=latent_scale_for("sdxl"))
    image = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(sdxl.encode(image) / 0.13025, sd1.encode(image) / 0.18215, atol=1e-6)
    latent = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(sdxl.decode(latent * 0.13025), sd1.decode(latent * 0.18215), atol=1e-6)


def test_encode_centre_crops_to_a_multiple_of_eight_and_drops_alpha() -> None:
    vae = tiny_vae()
    image = torch.rand(1, 21, 19, 4, generator=torch.Generator().manual_seed(7))
    cropped = image[:, 2:18, 1:17, :3]  # 21 -> 16 from offset 5 // 2, 19 -> 16 from 3 // 2
    assert torch.equal(crop_to_multiple(image, 8), image[:, 2:18, 1:17])
    assert torch.equal(vae.encode(image), vae.encode(cropped))


def test_batches_in_chunks_give_the_same_result() -> None:
    image = torch.rand(3, 16, 16, 3, generator=torch.Generator().manual_seed(8))
    whole, chunked = tiny_vae(), tiny_vae(max_batch=1)
    assert torch.allclose(whole.encode(image), chunked.encode(image), atol=1e-6)
    tiny_budget = tiny_vae(memory_budget=1)  # forces one image per pass
    assert tiny_budget._batch_limit(16 * 16) == 1


def test_bad_shapes_are_rejected_with_the_shape_named() -> None:
    vae = tiny_vae()
    with pytest.raises(ValueError, match=r"\(1, 3, 16, 16\)"):
        vae.encode(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        vae.decode(torch.rand(1, 16, 2, 2))


# ---- tiling -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "tile", "overlap", "align"),
    [(64, 64, 8, 1), (100, 64, 16, 1), (113, 64, 16, 1), (1024, 512, 64, 8), (520, 512, 64, 8)],
)
def test_tiles_cover_the_axis_with_at_least_the_overlap(length, tile, overlap, align) -> None:
    starts = tile_starts(length, tile, overlap, align)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] + size == length
    assert all(start % align == 0 for start in starts)
    assert all(a + size - b >= overlap for a, b in zip(starts, starts[1:], strict=False))


@pytest.mark.parametrize(("length", "tile", "overlap"), [(100, 64, 16), (113, 64, 16), (40, 8, 2)])
def test_seam_blend_weights_sum_to_one(length: int, tile: int, overlap: int) -> None:
    starts = tile_starts(length, tile, overlap)
    total = torch.zeros(length)
    for start, weight in zip(starts, blend_weights(starts, tile, length), strict=True):
        assert weight.min() > 0 and weight.max() <= 1
        total[start : start + tile] += weight
    assert torch.allclose(total, torch.ones(length), atol=1e-6)


def test_tiled_apply_of_a_local_function_is_seamless() -> None:
    x = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(9))

    def upscale(t: torch.Tensor) -> torch.Tensor:  # pixel-local, x8 like a decoder
        return F.interpolate(t * 2 + 1, scale_factor=8.0, mode="nearest")

    def downscale(t: torch.Tensor) -> torch.Tensor:  # 8x8-cell-local, /8 like an encoder
        return F.avg_pool2d(t, 8)

    tiled_up = tiled_apply(upscale, x, tile=16, overlap=4, scale=8, out_channels=3)
    assert torch.allclose(tiled_up, upscale(x), atol=1e-5)
    tiled_down = tiled_apply(downscale, x, tile=24, overlap=8, scale=1 / 8, out_channels=3)
    assert torch.allclose(tiled_down, downscale(x), atol=1e-6)


def test_one_tile_covering_the_input_is_exactly_untiled() -> None:
    vae = tiny_vae()
    image = torch.rand(1, 48, 40, 3, generator=torch.Generator().manual_seed(10))
    latent = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(11))
    assert torch.equal(vae.encode_tiled(image, tile_size=64, overlap=16), vae.encode(image))
    assert torch.equal(vae.decode_tiled(latent, tile_size=64, overlap=16), vae.decode(latent))


def test_overlapping_tiles_stay_close_to_untiled() -> None:
    """Not exact even for a perfect blend: each tile has its own GroupNorm statistics, zero
    padding at its borders and attention over itself only (true of ComfyUI's tiling too).
    Attention is made local here so the comparison measures the tiling, not the attention."""
    model = randomized(VAEConfig.tiny())
    with torch.no_grad():
        model.encoder.mid.attn_1.proj_out.weight.zero_()
        model.decoder.mid.attn_1.proj_out.weight.zero_()
    vae = VAE(model, latent_scale=0.18215)
    generator = torch.Generator().manual_seed(12)
    image = torch.rand(1, 64, 64, 3, generator=generator)
    latent = torch.randn(1, 4, 32, 32, generator=generator)
    encoded, encoded_tiled = vae.encode(image), vae.encode_tiled(image, 48, 16)
    decoded, decoded_tiled = vae.decode(latent), vae.decode_tiled(latent, 48, 16)
    assert (encoded_tiled - encoded).abs().mean() <= 0.1 * encoded.abs().mean()
    assert (decoded_tiled - decoded).abs().mean() <= 0.02  # in 0..1 image units
    assert rel_err(decoded_tiled, decoded) <= 0.1


def test_tiled_nodes_cap_the_overlap_at_a_quarter_tile() -> None:
    vae = tiny_vae()
    latent = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(13))
    calls: list[tuple[int, int]] = []
    vae.decode_tiled(latent, tile_size=64, overlap=64, progress=lambda i, n: calls.append((i, n)))
    # 96 px with 64 px tiles: overlap 64 -> 16 px (2 latent cells), so 2 x 2 tiles
    assert calls[-1] == (4, 4)


def test_attention_tokens_are_contiguous_so_cpu_sdpa_keeps_no_score_matrix() -> None:
    # strided tokens make PyTorch's CPU SDPA fall back to its math path, which holds the
    # (H*W)^2 scores: 2.3 GB for SDXL's 1024x1024 decode
    tokens = AttnBlock._tokens(torch.randn(1, 8, 4, 4))
    assert tokens.shape == (1, 1, 16, 8) and tokens.is_contiguous()
