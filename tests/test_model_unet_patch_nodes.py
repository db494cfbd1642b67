"""UNet and schedule patch nodes (nodes/model_unet_patches.py) and PAG on a real tiny UNet,
against references computed independently: numpy FFTs, twins with edited weights, and the
closed-form continuous schedules."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from engine.diffusion.networks.attention import CrossAttention
from engine.diffusion.networks.clip_text import TINY_CLIP_L_CONFIG, ClipTextModel
from engine.diffusion.networks.openclip_text import TINY_OPENCLIP_CONFIG, OpenClipTextModel
from engine.diffusion.networks.unet import UNet, UNetFamily
from engine.diffusion.networks.unet_patches import UNetCall
from engine.diffusion.patches.model_handle import SD1_LATENT, ModelHandle
from engine.diffusion.patches.patching import patched
from engine.diffusion.patches.token_patches import (
    HyperTile,
    bipartite_matching,
    hw_for_tokens,
    random_divisor,
)
from engine.diffusion.patches.unet_tweaks import FreeU
from engine.diffusion.sampling import model_sampling, sigmas_for
from engine.diffusion.sampling.guidance import Guider
from engine.diffusion.sampling.self_attention_guidance import (
    attention_with_probabilities,
    blur_where_attended,
    gaussian_blur,
)
from engine.diffusion.text.encoding import TextEncoderStack
from engine.diffusion.text.tokenizer import ClipBpe
from nodes import model_guidance
from nodes import model_unet_patches as nodes
from tests.diffusion.test_unet import tiny_unet, unet_inputs


def handle_for(unet: UNet) -> ModelHandle:
    return ModelHandle(unet, unet.config, "sd1", model_sampling("eps"), SD1_LATENT,
                       torch.float32, torch.device("cpu"))


def run_unet(model: ModelHandle, inputs: dict[str, Tensor]) -> Tensor:
    options = {"sigmas": torch.tensor([1.0, 1.0])}
    with torch.no_grad(), patched(model.unet, model.patches):
        return model.unet(**inputs, call=UNetCall(model.model_patches.unet, options))


def np_low_frequency_scale(x: np.ndarray, scale: float) -> np.ndarray:
    """FreeU's skip filter: frequencies -1 and 0 on both axes (the centred 2x2) times scale."""
    height, width = x.shape[-2:]
    ky, kx = np.fft.fftfreq(height) * height, np.fft.fftfreq(width) * width
    inside = ((ky >= -1) & (ky < 1))[:, None] & ((kx >= -1) & (kx < 1))[None]
    return np.fft.ifft2(np.fft.fft2(x) * np.where(inside, scale, 1.0)).real


def test_freeu_scales_half_the_backbone_and_the_skip_low_frequencies() -> None:
    generator = torch.Generator().manual_seed(0)
    h, skip = torch.randn(2, 128, 4, 4, generator=generator), torch.randn(2, 128, 4, 4)
    out_h, out_skip = FreeU.for_model(32, b1=1.5, b2=1.2, s1=0.3, s2=0.2)(h, skip, {})
    assert torch.allclose(out_h[:, :64], h[:, :64] * 1.5) and torch.equal(out_h[:, 64:], h[:, 64:])
    assert np.allclose(out_skip.numpy(), np_low_frequency_scale(skip.numpy(), 0.3), atol=1e-5)


def test_freeu_leaves_other_widths_alone() -> None:
    h, skip = torch.randn(1, 96, 4, 4), torch.randn(1, 96, 4, 4)
    out_h, out_skip = FreeU.for_model(32, 1.5, 1.2, 0.3, 0.2)(h, skip, {})
    assert out_h is h and out_skip is skip


def test_freeu_v2_scales_by_the_normalised_channel_mean() -> None:
    h, skip = torch.randn(1, 64, 3, 3), torch.randn(1, 64, 3, 3)
    out_h, _ = FreeU.for_model(32, 1.0, 1.4, 0.9, 0.2, v2=True)(h, skip, {})
    mean = h.numpy().mean(axis=1, keepdims=True)
    normalised = (mean - mean.min()) / (mean.max() - mean.min())
    expected = h.numpy()[:, :32] * ((1.4 - 1) * normalised + 1)
    assert np.allclose(out_h[:, :32].numpy(), expected, atol=1e-6)


def test_freeu_node_changes_a_real_unet_and_not_the_input_model() -> None:
    model = handle_for(tiny_unet(UNetFamily.SD1))
    (freeu,) = nodes.FreeUNode().execute(None, model, b1=1.1, b2=1.5, s1=0.9, s2=0.2)
    inputs = unet_inputs(model.config)
    assert model.model_patches.empty
    assert not torch.allclose(run_unet(freeu, inputs), run_unet(model, inputs))


def test_deep_shrink_downscales_its_block_inside_the_sigma_range_only() -> None:
    model = handle_for(tiny_unet(UNetFamily.SD1))
    (shrunk,) = nodes.PatchModelAddDownscale().execute(
        None, model, block_number=3, downscale_factor=2.0, start_percent=0.0, end_percent=1.0,
        downscale_after_skip=True, downscale_method="bicubic", upscale_method="bicubic")
    (patch,) = shrunk.model_patches.unet.input_block_patch_after_skip
    h = torch.randn(1, 32, 4, 4)
    assert patch(h, {"block": ("input", 3), "sigmas": torch.tensor([5.0])}).shape[-1] == 2
    assert patch(h, {"block": ("input", 2), "sigmas": torch.tensor([5.0])}) is h
    out = run_unet(shrunk, unet_inputs(model.config))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_deep_shrink_outside_its_range_changes_nothing() -> None:
    model = handle_for(tiny_unet(UNetFamily.SD1))
    (shrunk,) = nodes.PatchModelAddDownscale().execute(
        None, model, block_number=3, downscale_factor=2.0, start_percent=0.5, end_percent=0.6,
        downscale_after_skip=False, downscale_method="bilinear", upscale_method="bilinear")
    inputs = unet_inputs(model.config)
    assert torch.equal(run_unet(shrunk, inputs), run_unet(model, inputs))  # sigma 1: late


@pytest.mark.parametrize(("node", "attention"), [(nodes.UNetSelfAttentionMultiply, "attn1"),
                                                 (nodes.UNetCrossAttentionMultiply, "attn2")])
def test_attention_multiply_equals_scaled_projection_weights(node: Any, attention: str) -> None:
    unet = tiny_unet(UNetFamily.SD1)
    model = handle_for(unet)
    (scaled,) = node().execute(None, model, q=1.5, k=0.5, v=2.0, out=0.8)
    twin = copy.deepcopy(unet)
    with torch.no_grad():
        for name, param in twin.named_parameters():
            for part, factor in (("to_q", 1.5), ("to_k", 0.5), ("to_v", 2.0), ("to_out", 0.8)):
                if f"{attention}.{part}" in name:
                    param.mul_(factor)
    inputs = unet_inputs(model.config)
    assert torch.allclose(run_unet(scaled, inputs), run_unet(handle_for(twin), inputs),
                          atol=1e-5)
    assert torch.equal(run_unet(model, inputs), run_unet(handle_for(unet), inputs))


def test_clip_attention_multiply_scales_plain_and_packed_projections() -> None:
    clip_l = ClipTextModel(dataclasses.replace(TINY_CLIP_L_CONFIG, layers=1))
    clip_g = OpenClipTextModel(dataclasses.replace(TINY_OPENCLIP_CONFIG, layers=1, width=48,
                                                   heads=3))
    stack = TextEncoderStack("sdxl", {"l": clip_l, "g": clip_g}, ClipBpe.load())
    (scaled,) = nodes.CLIPAttentionMultiply().execute(None, stack, q=2.0, k=1.0, v=3.0, out=0.5)
    packed = clip_g.transformer.resblocks[0].attn
    before = packed.in_proj_weight.detach().clone()
    with patched(clip_g, scaled.patches["g"]):
        after = packed.in_proj_weight.detach()
        assert torch.allclose(after[:48], before[:48] * 2)
        assert torch.equal(after[48:96], before[48:96])
        assert torch.allclose(after[96:], before[96:] * 3)
    attention = clip_l.encoder.layers[0].self_attn  # type: ignore[union-attr,index]
    q_weight, out_bias = attention.q_proj.weight.detach().clone(), attention.out_proj.bias.clone()
    with patched(clip_l, scaled.patches["l"]):
        assert torch.allclose(attention.q_proj.weight, q_weight * 2)
        assert torch.allclose(attention.out_proj.bias, out_bias * 0.5)
    assert stack.patches.get("l", ()) == ()


def test_pag_pushes_away_from_the_identity_middle_attention_prediction() -> None:
    unet = tiny_unet(UNetFamily.SD1)
    model = handle_for(unet)
    (pag,) = model_guidance.PerturbedAttentionGuidance().execute(None, model, scale=2.0)
    context = torch.randn(1, 7, unet.config.context_dim, generator=torch.Generator().manual_seed(4))
    positive, negative = [[context, {}]], [[context * 0.5, {}]]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([1.5])
    inputs = Guider(pag, positive, negative, 4.0).prepare
    from tests.diffusion.test_guidance import inputs_for
    with torch.no_grad():
        out = inputs(inputs_for((1, 4, 8, 8)))(x, sigma)
        plain_guided = Guider(model, positive, negative, 4.0).prepare(inputs_for((1, 4, 8, 8)))
        guided = plain_guided(x, sigma)
        cond = Guider(model, positive, None, 1.0).prepare(inputs_for((1, 4, 8, 8)))(x, sigma)
        twin = copy.deepcopy(unet)
        for block in twin.middle_block[1].transformer_blocks:  # type: ignore[union-attr]
            block.attn1.attend = lambda q, k, v: v  # softmax(QK^T) -> identity
        perturbed = Guider(handle_for(twin), positive, None, 1.0).prepare(
            inputs_for((1, 4, 8, 8)))(x, sigma)
    assert torch.allclose(out, guided + (cond - perturbed) * 2.0, atol=1e-5)


def test_continuous_edm_schedule_maps_sigma_to_a_quarter_log() -> None:
    model = handle_for(tiny_unet(UNetFamily.SD1))
    (edm,) = nodes.ModelSamplingContinuousEDM().execute(None, model, sampling="edm",
                                                        sigma_max=80.0, sigma_min=0.002)
    sampling = edm.sampling
    sigma = torch.tensor([3.0])
    assert torch.allclose(sampling.timestep(sigma), torch.tensor([0.25 * math.log(3.0)]))
    assert torch.allclose(sampling.sigma(sampling.timestep(sigma)), sigma)
    assert math.isclose(float(sampling.sigma_max), 80.0, rel_tol=1e-5)
    midway = math.exp((math.log(80.0) + math.log(0.002)) / 2)
    assert math.isclose(sampling.percent_to_sigma(0.5), midway, rel_tol=1e-6)


def test_continuous_edm_denoiser_uses_edm_skip_and_output_scalings() -> None:
    model = handle_for(tiny_unet(UNetFamily.SD1))
    (edm,) = nodes.ModelSamplingContinuousEDM().execute(None, model, sampling="edm",
                                                        sigma_max=80.0, sigma_min=0.002)
    x, output, sigma = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.tensor([2.0])
    sigma_data = 0.5
    c_skip = sigma_data**2 / (4.0 + sigma_data**2)
    c_out = 2.0 * sigma_data / math.sqrt(4.0 + sigma_data**2)
    expected = c_skip * x + c_out * output
    assert torch.allclose(edm.sampling.calculate_denoised(sigma, output, x), expected)
    assert torch.allclose(edm.sampling.calculate_input(sigma, x), x / math.sqrt(4.25))


def test_continuous_v_schedule_maps_sigma_by_arctangent_and_schedules_karras() -> None:
    model = handle_for(tiny_unet(UNetFamily.SD1))
    (cosine,) = nodes.ModelSamplingContinuousV().execute(None, model, sampling="v_prediction",
                                                         sigma_max=500.0, sigma_min=0.03)
    sampling = cosine.sampling
    assert torch.allclose(sampling.timestep(torch.tensor([1.0])), torch.tensor([0.5]))
    sigmas = sigmas_for(sampling, "karras", 5, 1.0)
    assert math.isclose(float(sigmas[0]), 500.0, rel_tol=1e-4) and float(sigmas[-1]) == 0.0


def test_continuous_edm_refuses_families_loom_does_not_run() -> None:
    problem = nodes.ModelSamplingContinuousEDM().validate(None, sampling="cosmos_rflow")
    assert problem is not None and problem[0] == "sampling" and "Cosmos" in problem[1]


def test_hypertile_tiles_are_spatial_and_join_restores_the_layout() -> None:
    tiles = HyperTile(tile_size=32, swap_size=1, max_depth=0, scale_depth=False)
    grid = torch.arange(8 * 8, dtype=torch.float32).view(1, 64, 1)  # token t holds t
    n, _, _ = tiles.split(grid, grid, grid, {"original_shape": [1, 4, 8, 8]})
    # tile 32 px = 4 cells: 2 x 2 tiles of 4 x 4 cells, row-major
    first_tile = [row * 8 + col for row in range(4) for col in range(4)]
    assert n.shape == (4, 16, 1) and n[0, :, 0].tolist() == first_tile
    assert torch.equal(tiles.join(n, {}), grid)


def test_hypertile_skips_deeper_levels_than_max_depth() -> None:
    tiles = HyperTile(tile_size=32, swap_size=1, max_depth=0, scale_depth=False)
    deep = torch.randn(1, 16, 4)  # a 4 x 4 map of an 8 x 8 latent: depth 1
    assert tiles.split(deep, deep, deep, {"original_shape": [1, 4, 8, 8]})[0] is deep
    assert tiles.join(deep, {}) is deep


def test_random_divisor_and_token_grids() -> None:
    assert random_divisor(64, 32, 1, counter=5) == 2  # smallest divisor >= 32 is 32
    assert random_divisor(12, 100, 3, counter=0) == 1  # min_value capped at the value
    assert hw_for_tokens(4096, 1.0) == (64, 64)
    # ComfyUI's first guess is h = sqrt(tokens * w / h) (so for wide maps h > w), kept as is
    assert hw_for_tokens(24, 1.5) == (6, 4) and hw_for_tokens(12, 1.5) == (4, 3)


def test_attention_over_fewer_key_batches_reads_runs_of_consecutive_tokens() -> None:
    attention = CrossAttention(8, 8, heads=2, dim_head=4)
    q, k, v = torch.randn(4, 3, 8), torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    together = attention.attend(q, k, v)
    for index in range(4):
        sample, run = divmod(index, 2)
        keys = slice(run * 3, run * 3 + 3)
        alone = attention.attend(q[index:index + 1], k[sample:sample + 1, keys],
                                 v[sample:sample + 1, keys])
        assert torch.allclose(together[index], alone[0], atol=1e-6)


def test_hypertile_node_runs_a_real_unet() -> None:
    model = handle_for(tiny_unet(UNetFamily.SD1))
    (tiled,) = nodes.HyperTileNode().execute(None, model, tile_size=32, swap_size=1,
                                             max_depth=0, scale_depth=False)
    inputs = unet_inputs(model.config)
    out = run_unet(tiled, inputs)
    assert torch.isfinite(out).all() and not torch.allclose(out, run_unet(model, inputs))


def test_token_merging_round_trip_is_exact_for_tokens_equal_within_each_cell() -> None:
    cells = torch.randn(1, 4, 4, 6)  # one vector per 2 x 2 cell of an 8 x 8 map
    x = cells.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(1, 64, 6)
    merge, unmerge = bipartite_matching(x, 8, 8, 2, r=32, generator=torch.Generator())
    merged = merge(x)
    assert merged.shape == (1, 32, 6)
    assert torch.allclose(unmerge(merged), x, atol=1e-6)


def test_token_merging_leaves_lower_resolutions_and_ratio_zero_alone() -> None:
    model = handle_for(tiny_unet(UNetFamily.SD1))
    (unmerged,) = nodes.TomePatchModel().execute(None, model, ratio=0.0)
    inputs = unet_inputs(model.config)
    assert torch.allclose(run_unet(unmerged, inputs), run_unet(model, inputs), atol=1e-6)
    (merged,) = nodes.TomePatchModel().execute(None, model, ratio=0.5)
    out = run_unet(merged, inputs)
    assert torch.isfinite(out).all() and not torch.allclose(out, run_unet(model, inputs))


def test_attention_with_probabilities_matches_sdpa_and_rows_sum_to_one() -> None:
    q, k, v = torch.randn(2, 5, 8), torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    out, probabilities = attention_with_probabilities(q, k, v, heads=2)
    reference = CrossAttention(8, 8, heads=2, dim_head=4).attend(q, k, v)
    assert torch.allclose(out, reference, atol=1e-5) and probabilities.shape == (4, 5, 7)
    assert torch.allclose(probabilities.sum(-1), torch.ones(4, 5))


def test_gaussian_blur_keeps_constants_and_weights_by_the_normal_density() -> None:
    flat = torch.full((1, 2, 12, 12), 3.0)
    assert torch.allclose(gaussian_blur(flat, 9, 2.0), flat)
    impulse = torch.zeros(1, 1, 21, 21)
    impulse[0, 0, 10, 10] = 1.0
    offsets = np.arange(-4, 5)
    density = np.exp(-0.5 * (offsets / 2.0) ** 2)
    kernel = np.outer(density, density) / density.sum() ** 2
    assert np.allclose(gaussian_blur(impulse, 9, 2.0)[0, 0, 6:15, 6:15].numpy(), kernel,
                       atol=1e-6)


def test_sag_blurs_only_where_attention_gathers() -> None:
    x0 = torch.randn(1, 4, 8, 8)
    probabilities = torch.full((2, 16, 16), 1 / 16)  # 2 heads over a 4 x 4 map, uniform
    probabilities[:, :, 0] = 0.5  # every query gives token 0 (the top-left cell) half its mass
    probabilities[:, :, 1:] = 0.5 / 15
    out = blur_where_attended(x0, probabilities, sigma=1.0)
    blurred = gaussian_blur(x0, 9, 1.0)
    assert torch.allclose(out[..., :2, :2], blurred[..., :2, :2])  # token 0 -> cells 0..1
    assert torch.equal(out[..., 2:, :], x0[..., 2:, :]) and torch.equal(out[..., :, 2:],
                                                                         x0[..., :, 2:])


def test_sag_node_records_the_negative_middle_attention_and_guides_with_it() -> None:
    unet = tiny_unet(UNetFamily.SD1)
    model = handle_for(unet)
    context = torch.randn(1, 7, unet.config.context_dim, generator=torch.Generator().manual_seed(4))
    positive, negative = [[context, {}]], [[context * 0.5, {}]]
    x, sigma = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)), torch.ones(1)
    from tests.diffusion.test_guidance import inputs_for

    def guided_with(node_model: ModelHandle, cfg: float) -> Tensor:
        return Guider(node_model, positive, negative, cfg).prepare(inputs_for((1, 4, 8, 8)))(
            x, sigma)

    with torch.no_grad():
        (off,) = model_guidance.SelfAttentionGuidanceNode().execute(None, model, scale=0.0,
                                                                    blur_sigma=2.0)
        assert torch.allclose(guided_with(off, 4.0), guided_with(model, 4.0), atol=1e-5)
        (sag,) = model_guidance.SelfAttentionGuidanceNode().execute(None, model, scale=0.8,
                                                                    blur_sigma=2.0)
        out = guided_with(sag, 1.0)  # cfg 1 still evaluates the negative for SAG
    recorder = sag.model_patches.unet.attn1_replace[("middle", 0, 0)].__self__
    assert recorder.probabilities.shape == (2, 16, 16)  # the negative pass, 2 heads
    assert torch.isfinite(out).all() and not torch.allclose(out, guided_with(model, 1.0))
