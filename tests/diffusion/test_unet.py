"""UNet: checkpoint key layout of every family, parity with diffusers' UNet2DConditionModel on
identical random weights, SDXL vector conditioning, ControlNet residual hooks, dtypes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.diffusion.networks.attention import CrossAttention
from engine.diffusion.networks.unet import (
    ADM_NUMBER_DIM,
    CHECKPOINT_PREFIX,
    UNet,
    UNetConfig,
    UNetFamily,
    sdxl_adm,
    sdxl_refiner_adm,
    timestep_embedding,
)
from tests.diffusion.manifests import manifest
from tests.numerics import rel_err

PARITY_TOLERANCE = 1e-4
# SDXL size/crop numbers used with both implementations (diffusers takes them as time_ids).
SIZES = {"width": 1024, "height": 768, "crop_w": 16, "crop_h": 32}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm scales around 1), so no term of the parity check is trivial."""
    generator = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=generator)
                is_scale = isinstance(module, norms) and name == "weight"
                param.copy_(1.0 + 0.1 * noise if is_scale else 0.05 * noise)
    return model.eval()


def tiny_unet(family: UNetFamily, in_channels: int = 4, seed: int = 0) -> UNet:
    return randomize(UNet(UNetConfig.tiny(family, in_channels)), seed)


def unet_inputs(config: UNetConfig, batch: int = 2, height: int = 8, width: int = 8,
                tokens: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, config.in_channels, height, width, generator=generator),
        "timesteps": torch.tensor([999.0, 1.5][:batch]),
        "context": torch.randn(batch, tokens, config.context_dim, generator=generator),
    }


def pooled_width(config: UNetConfig, numbers: int) -> int:
    assert config.adm_in_channels is not None
    return config.adm_in_channels - numbers * ADM_NUMBER_DIM


# --- diffusers reference -------------------------------------------------------------------


def diffusers_config(config: UNetConfig) -> dict:
    """UNet2DConditionModel kwargs for the same architecture (diffusers' `attention_head_dim`
    is a head count; its middle block takes the last level's depth)."""
    widths = [config.model_channels * mult for mult in config.channel_mult]
    has_attention = [depth > 0 for depth in config.transformer_depth]
    depths = [depth or config.transformer_depth_middle for depth in config.transformer_depth]
    assert depths[-1] == config.transformer_depth_middle, "diffusers ties mid depth to last level"
    heads = config.num_heads or [width // config.num_head_channels for width in widths]
    kwargs = {
        "sample_size": 8, "in_channels": config.in_channels, "out_channels": config.out_channels,
        "block_out_channels": widths, "layers_per_block": config.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D"
                           for a in reversed(has_attention)],
        "cross_attention_dim": config.context_dim, "attention_head_dim": heads,
        "use_linear_projection": config.use_linear_in_transformer,
        "transformer_layers_per_block": depths,
    }
    if config.adm_in_channels is not None:
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=ADM_NUMBER_DIM,
                      projection_class_embeddings_input_dim=config.adm_in_channels)
    return kwargs


def diffusers_twin(model: UNet) -> torch.nn.Module:
    """diffusers' UNet loaded, through diffusers' own single-file converter, with our weights."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    kwargs = diffusers_config(model.config)
    checkpoint = {CHECKPOINT_PREFIX + key: value for key, value in model.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, kwargs)
    reference = UNet2DConditionModel(**kwargs)
    reference.load_state_dict(converted, strict=True)
    return reference.eval()


def reference_forward(reference: torch.nn.Module, inputs: dict[str, torch.Tensor],
                      added: dict[str, torch.Tensor] | None = None, **extra) -> torch.Tensor:
    return reference(inputs["x"], inputs["timesteps"], inputs["context"],
                     added_cond_kwargs=added, return_dict=False, **extra)[0]


def assert_parity(family: UNetFamily, in_channels: int = 4, height: int = 8, width: int = 8,
                  tokens: int = 7) -> None:
    model = tiny_unet(family, in_channels)
    inputs = unet_inputs(model.config, height=height, width=width, tokens=tokens)
    with torch.no_grad():
        expected = reference_forward(diffusers_twin(model), inputs)
        got = model(**inputs)
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= PARITY_TOLERANCE


# --- parity ------------------------------------------------------------------------------


def test_timestep_embedding_matches_diffusers_cos_first_convention() -> None:
    from diffusers.models.embeddings import get_timestep_embedding

    timesteps = torch.tensor([0.0, 1.0, 17.5, 999.0])
    expected = get_timestep_embedding(timesteps, 320, flip_sin_to_cos=True,
                                      downscale_freq_shift=0)
    assert torch.equal(timestep_embedding(timesteps, 320), expected)


def test_sd1_matches_diffusers() -> None:
    assert_parity(UNetFamily.SD1)


def test_sd2_linear_projection_and_64_wide_heads_match_diffusers() -> None:
    assert_parity(UNetFamily.SD2)


def test_inpainting_nine_channel_input_matches_diffusers() -> None:
    assert_parity(UNetFamily.SD1, in_channels=9)


def test_odd_latent_size_upsamples_to_the_skip_size_like_diffusers() -> None:
    assert_parity(UNetFamily.SD1, height=9, width=11)


def test_sdxl_adm_and_label_emb_match_diffusers_text_time_embedding() -> None:
    model = tiny_unet(UNetFamily.SDXL)
    inputs = unet_inputs(model.config)
    pooled = torch.randn(2, pooled_width(model.config, 6),
                         generator=torch.Generator().manual_seed(5))
    targets = {"target_width": 896, "target_height": 640}
    # diffusers' add_time_ids: original size (h, w), crop (top, left), target size (h, w)
    time_ids = torch.tensor([[768, 1024, 32, 16, 640, 896]] * 2, dtype=torch.float32)
    with torch.no_grad():
        expected = reference_forward(diffusers_twin(model), inputs,
                                     {"text_embeds": pooled, "time_ids": time_ids})
        got = model(**inputs, y=sdxl_adm(pooled, **SIZES, **targets))
    assert rel_err(got, expected) <= PARITY_TOLERANCE


def test_sdxl_refiner_adm_with_aesthetic_score_matches_diffusers() -> None:
    model = tiny_unet(UNetFamily.SDXL_REFINER)
    inputs = unet_inputs(model.config)
    pooled = torch.randn(2, pooled_width(model.config, 5),
                         generator=torch.Generator().manual_seed(5))
    # refiner time_ids: original size (h, w), crop (top, left), aesthetic score
    time_ids = torch.tensor([[768, 1024, 32, 16, 6.0]] * 2, dtype=torch.float32)
    with torch.no_grad():
        expected = reference_forward(diffusers_twin(model), inputs,
                                     {"text_embeds": pooled, "time_ids": time_ids})
        got = model(**inputs, y=sdxl_refiner_adm(pooled, **SIZES, aesthetic_score=6.0))
    assert rel_err(got, expected) <= PARITY_TOLERANCE


def test_residual_hooks_match_diffusers_controlnet_residuals() -> None:
    model = tiny_unet(UNetFamily.SD1)
    inputs = unet_inputs(model.config)
    down, mid = controlnet_like_residuals(model, inputs)
    with torch.no_grad():
        expected = reference_forward(diffusers_twin(model), inputs,
                                     down_block_additional_residuals=tuple(down),
                                     mid_block_additional_residual=mid)
        got = model(**inputs, down_residuals=down, mid_residual=mid)
    assert rel_err(got, expected) <= PARITY_TOLERANCE


# --- residual hooks ------------------------------------------------------------------------


def controlnet_like_residuals(model: UNet, inputs: dict[str, torch.Tensor],
                              scale: float = 0.5) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Random tensors shaped like each input block's output and the middle block's output."""
    shapes: list[torch.Size] = []
    hooks = [stage.register_forward_hook(lambda _m, _i, out: shapes.append(out.shape))
             for stage in [*model.input_blocks, model.middle_block]]
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    generator = torch.Generator().manual_seed(7)
    residuals = [scale * torch.randn(shape, generator=generator) for shape in shapes]
    return residuals[:-1], residuals[-1]


def test_zero_residuals_change_nothing() -> None:
    model = tiny_unet(UNetFamily.SD1)
    inputs = unet_inputs(model.config)
    down, mid = controlnet_like_residuals(model, inputs, scale=0.0)
    with torch.no_grad():
        assert torch.equal(model(**inputs, down_residuals=down, mid_residual=mid), model(**inputs))


def test_down_residual_changes_the_output() -> None:
    model = tiny_unet(UNetFamily.SD1)
    inputs = unet_inputs(model.config)
    down, _ = controlnet_like_residuals(model, inputs)
    with torch.no_grad():
        assert not torch.allclose(model(**inputs, down_residuals=down), model(**inputs))


def test_mid_residual_changes_the_output() -> None:
    model = tiny_unet(UNetFamily.SD1)
    inputs = unet_inputs(model.config)
    _, mid = controlnet_like_residuals(model, inputs)
    with torch.no_grad():
        assert not torch.allclose(model(**inputs, mid_residual=mid), model(**inputs))


def test_wrong_number_of_down_residuals_is_rejected_with_the_expected_count() -> None:
    model = tiny_unet(UNetFamily.SD1)
    inputs = unet_inputs(model.config)
    down, _ = controlnet_like_residuals(model, inputs)
    with pytest.raises(ValueError, match=f"{len(model.input_blocks)} input blocks"):
        model(**inputs, down_residuals=down[:-1])


# --- input checks and dtypes ---------------------------------------------------------------


def test_latent_with_wrong_channel_count_names_the_expected_shape() -> None:
    model = tiny_unet(UNetFamily.SD1, in_channels=9)
    with pytest.raises(ValueError, match=r"\(B, 9, H, W\)"):
        model(**unet_inputs(UNetConfig.tiny(UNetFamily.SD1)))


def test_sdxl_without_y_is_rejected() -> None:
    model = tiny_unet(UNetFamily.SDXL)
    with pytest.raises(ValueError, match="sdxl_adm"):
        model(**unet_inputs(model.config))


def test_context_of_another_family_is_rejected() -> None:
    model = tiny_unet(UNetFamily.SD2)
    inputs = unet_inputs(UNetConfig.tiny(UNetFamily.SD1))
    with pytest.raises(ValueError, match="context"):
        model(**inputs)


def test_timesteps_must_be_one_per_sample() -> None:
    model = tiny_unet(UNetFamily.SD1)
    inputs = {**unet_inputs(model.config, batch=2), "timesteps": torch.tensor([1.0, 2.0, 3.0])}
    with pytest.raises(ValueError, match="one per sample"):
        model(**inputs)


def test_config_needs_exactly_one_head_rule() -> None:
    with pytest.raises(ValueError, match="exactly one of num_heads"):
        dataclasses.replace(UNetConfig.tiny(UNetFamily.SD1), num_head_channels=16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_close_to_fp32_and_returns_the_input_dtype(dtype) -> None:
    model = tiny_unet(UNetFamily.SDXL)
    inputs = unet_inputs(model.config)
    pooled = torch.randn(2, pooled_width(model.config, 6))
    y = sdxl_adm(pooled, **SIZES, target_width=1024, target_height=768)
    with torch.no_grad():
        expected = model(**inputs, y=y)
        got = model.to(dtype)(**inputs, y=y)
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert rel_err(got, expected) <= 0.05


def test_channels_last_input_gives_the_same_result() -> None:
    model = tiny_unet(UNetFamily.SD2)
    inputs = unet_inputs(model.config)
    channels_last = {**inputs, "x": inputs["x"].to(memory_format=torch.channels_last)}
    with torch.no_grad():
        assert rel_err(model(**channels_last), model(**inputs)) <= 1e-5


# --- checkpoint layout ---------------------------------------------------------------------


def unet_shapes_in_format(name: str) -> dict[str, tuple[int, ...]]:
    return {key.removeprefix(CHECKPOINT_PREFIX): shape
            for key, (_dtype, shape) in manifest(name).items() if key.startswith(CHECKPOINT_PREFIX)}


@pytest.mark.parametrize(("format_name", "family", "in_channels"), [
    ("sd15", UNetFamily.SD1, 4),
    ("sd15_inpaint", UNetFamily.SD1, 9),
    ("sd21v", UNetFamily.SD2, 4),
    ("sdxl_base", UNetFamily.SDXL, 4),
    ("sdxl_refiner", UNetFamily.SDXL_REFINER, 4),
])
def test_full_size_state_dict_matches_the_checkpoint_layout(format_name, family,
                                                            in_channels) -> None:
    expected = unet_shapes_in_format(format_name)
    with torch.device("meta"):
        model = UNet(UNetConfig.preset(family, in_channels))
    got = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert got == expected


@pytest.mark.parametrize(("family", "heads_and_widths"), [
    (UNetFamily.SD1, {(8, 40), (8, 80), (8, 160)}),  # 8 heads at every level
    (UNetFamily.SD2, {(5, 64), (10, 64), (20, 64)}),  # 64-wide heads
    (UNetFamily.SDXL, {(10, 64), (20, 64)}),
    (UNetFamily.SDXL_REFINER, {(12, 64), (24, 64)}),
])
def test_full_size_attention_heads_follow_the_family_rule(family, heads_and_widths) -> None:
    with torch.device("meta"):
        model = UNet(UNetConfig.preset(family))
    got = {(module.heads, module.to_q.out_features // module.heads)
           for module in model.modules() if isinstance(module, CrossAttention)}
    assert got == heads_and_widths


def test_checkpoint_tensors_load_with_assign_after_stripping_the_prefix(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    model = tiny_unet(UNetFamily.SDXL)
    path = tmp_path / "unet.safetensors"
    save_file({CHECKPOINT_PREFIX + key: value for key, value in model.state_dict().items()}, path)
    with torch.device("meta"):
        loaded = UNet(model.config)
    state = {key.removeprefix(CHECKPOINT_PREFIX): value for key, value in load_file(path).items()}
    loaded.load_state_dict(state, strict=True, assign=True)
    loaded.to(dtype=torch.float32, memory_format=torch.channels_last)
    inputs = unet_inputs(model.config)
    y = torch.randn(2, model.config.adm_in_channels)
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs, y=y), model(**inputs, y=y), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_full_size_sd15_matches_diffusers_in_fp32() -> None:
    model = randomize(UNet(UNetConfig.preset(UNetFamily.SD1)))
    inputs = unet_inputs(model.config, batch=2, height=64, width=64, tokens=77)
    with torch.no_grad():
        expected = reference_forward(diffusers_twin(model), inputs)
        got = model(**inputs)
    assert rel_err(got, expected) <= PARITY_TOLERANCE
