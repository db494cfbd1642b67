"""CLIP vision and style-model nodes: the vision tower matches transformers on the same
weights, ComfyUI's preprocessing, the style adapter's shapes and strength, and the four
nodes through the engine (loaders, encode, apply in both strength modes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from engine.diffusion.networks.clip_vision import (
    CLIP_MEAN,
    CLIP_STD,
    ClipVisionModel,
    ClipVisionOutput,
    VisionConfig,
    clip_preprocess,
    load_clip_vision,
)
from engine.diffusion.networks.openclip_text import PackedQkvAttention
from engine.diffusion.networks.style_model import StyleAdapter, StyleConfig
from nodes.clip_vision import StyleModelApply, apply_style
from tests.model_engine import ModelEngine, node, probed
from tests.numerics import rel_err

TEXT_WIDTH = 64  # the tiny sd15 checkpoint's text encoder width


def randomized(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return module.eval()


def hf_vision(heads: int, activation: str, seed: int = 0) -> CLIPVisionModelWithProjection:
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=heads, image_size=28, patch_size=14,
                              projection_dim=32, hidden_act=activation)
    return randomized(CLIPVisionModelWithProjection(config), seed)


def tiny_style_state(width: int = 64, context_dim: int = TEXT_WIDTH) -> dict[str, torch.Tensor]:
    config = StyleConfig(width=width, layers=2, tokens=8, context_dim=context_dim)
    return randomized(StyleAdapter(config), seed=3).state_dict()


# --- the vision tower ----------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_vision_tower_matches_transformers(activation: str) -> None:
    reference = hf_vision(heads=4, activation=activation)
    config = VisionConfig(width=64, layers=3, heads=4, mlp_width=128, patch_size=14,
                          image_size=28, projection_dim=32, activation=activation)
    ours = ClipVisionModel(config)
    ours.load_state_dict({k: v for k, v in reference.state_dict().items()
                          if not k.endswith("position_ids")})
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True)
        out = ours(pixels)
    assert rel_err(out.image_embeds, expected.image_embeds) <= 1e-4
    assert rel_err(out.last_hidden_state, expected.last_hidden_state) <= 1e-4
    assert rel_err(out.penultimate_hidden_states, expected.hidden_states[-2]) <= 1e-4


def test_config_is_read_from_the_weights() -> None:
    model = load_clip_vision(hf_vision(heads=1, activation="gelu").state_dict())
    assert model.config == VisionConfig(width=64, layers=3, heads=1, mlp_width=128,
                                        patch_size=14, image_size=28, projection_dim=32,
                                        activation="gelu")


def test_a_file_without_vision_weights_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="not a CLIP vision model"):
        load_clip_vision({"text_model.final_layer_norm.weight": torch.ones(4)})


def test_vision_output_is_subscriptable_like_comfyui_output() -> None:
    out = ClipVisionOutput(torch.ones(1, 2), torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))
    assert out["image_embeds"] is out.image_embeds
    assert out["mm_projected"] is None
    with pytest.raises(KeyError, match="no 'pooled'"):
        out["pooled"]


# --- preprocessing -------------------------------------------------------------------------


def test_center_crop_keeps_the_middle_and_normalises_with_clip_statistics() -> None:
    # A 2x4 image at size 2: the shorter side is already 2, so only the middle columns stay.
    values = torch.arange(8, dtype=torch.float32).view(1, 2, 4, 1) * 30 / 255
    image = values.expand(1, 2, 4, 3)
    pixels = clip_preprocess(image, size=2, crop="center")
    middle = values[0, :, 1:3, 0]  # (2, 2)
    for channel in range(3):
        expected = (middle - CLIP_MEAN[channel]) / CLIP_STD[channel]
        assert torch.allclose(pixels[0, channel], expected, atol=1e-5)


def test_pixels_are_rounded_to_8_bit_steps_before_normalising() -> None:
    image = torch.full((1, 2, 2, 3), 0.5)  # 127.5 rounds to 128
    pixels = clip_preprocess(image, size=2)
    assert torch.allclose(pixels[0, 0], torch.full((2, 2), (128 / 255 - CLIP_MEAN[0])
                                                    / CLIP_STD[0]))


@pytest.mark.parametrize("crop", ["center", "none"])
def test_any_image_becomes_a_square_at_the_model_size(crop: str) -> None:
    pixels = clip_preprocess(torch.rand(2, 300, 200, 3), size=224, crop=crop)
    assert pixels.shape == (2, 3, 224, 224)


# --- the style model -----------------------------------------------------------------------


def test_style_attention_matches_torch_multihead_attention() -> None:
    ours = randomized(PackedQkvAttention(64, heads=8, causal=False), seed=4)
    reference = nn.MultiheadAttention(64, 8, batch_first=True)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        expected, _ = reference(x, x, x, need_weights=False)
        assert rel_err(ours(x), expected) <= 1e-5


def test_style_model_gives_its_tokens_for_every_image_in_one_row() -> None:
    adapter = StyleAdapter(StyleConfig(width=64, layers=2, tokens=8, context_dim=48))
    adapter.load_state_dict(tiny_style_state(context_dim=48))
    hidden = torch.randn(3, 5, 64)
    assert adapter(hidden).shape == (3, 8, 48)
    assert adapter.style_tokens(hidden).shape == (1, 24, 48)


def test_strength_scales_the_style_tokens_and_inputs_are_untouched() -> None:
    adapter = StyleAdapter(StyleConfig(width=64, layers=2, tokens=8, context_dim=TEXT_WIDTH))
    adapter.load_state_dict(tiny_style_state())
    vision = ClipVisionOutput(torch.zeros(1, 32), torch.randn(1, 5, 64), torch.zeros(1, 5, 64))
    cond = torch.randn(1, 77, TEXT_WIDTH)
    conditioning = [[cond, {"pooled_output": None}]]

    def apply(strength: float) -> Any:
        return StyleModelApply().execute(None, conditioning, adapter, vision, strength,
                                         "multiply")[0]

    full, half = apply(1.0), apply(0.5)
    assert torch.equal(half[0][0][:, :77], cond)
    assert torch.allclose(half[0][0][:, 77:], full[0][0][:, 77:] * 0.5)
    assert conditioning[0][0] is cond and cond.shape == (1, 77, TEXT_WIDTH)
    assert half[0][1] == {"pooled_output": None} and half[0][1] is not conditioning[0][1]


# --- the nodes through the engine ----------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> ModelEngine:
    engine = ModelEngine(tmp_path_factory.mktemp("clip_vision"))
    engine.checkpoint("sd15", "tiny_sd15.safetensors")
    write(engine.base / "models" / "clip_vision" / "tiny_vision.safetensors",
          hf_vision(heads=1, activation="gelu").state_dict())
    write(engine.base / "models" / "style_models" / "tiny_style.safetensors",
          tiny_style_state())
    return engine


def write(path: Path, state: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))


def style_workflow(strength_type: str = "multiply") -> dict[str, Any]:
    return {
        "1": node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors"),
        "2": node("CLIPTextEncode", text="a cat", clip=["1", 1]),
        "3": node("CLIPVisionLoader", clip_name="tiny_vision.safetensors"),
        "4": node("EmptyImage", width=40, height=30, batch_size=2, color=0x336699),
        "5": node("CLIPVisionEncode", clip_vision=["3", 0], image=["4", 0], crop="center"),
        "6": node("StyleModelLoader", style_model_name="tiny_style.safetensors"),
        "7": node("StyleModelApply", conditioning=["2", 0], style_model=["6", 0],
                  clip_vision_output=["5", 0], strength=1.0, strength_type=strength_type),
    }


def test_style_model_apply_appends_style_tokens_for_each_image(engine: ModelEngine) -> None:
    result, _ = engine.run(probed(style_workflow(), "2", "5", "7"))
    text = result.values["2"][0][0]
    encoded = result.values["5"][0][0]
    styled = result.values["7"][0][0]
    assert encoded.image_embeds.shape == (2, 32)
    assert encoded.last_hidden_state.shape == (2, 5, 64)
    assert styled[0][0].shape == (1, text[0][0].shape[1] + 2 * 8, TEXT_WIDTH)
    assert torch.equal(styled[0][0][:, : text[0][0].shape[1]], text[0][0])


def test_attn_bias_appends_unscaled_tokens_with_a_log_bias_mask(engine: ModelEngine) -> None:
    workflow = style_workflow("attn_bias")
    workflow["7"]["inputs"]["strength"] = 0.5
    result, _ = engine.run(probed(workflow, "2", "7"))
    plain, _ = engine.run(probed(style_workflow("multiply"), "7"))
    text_tokens = result.values["2"][0][0][0][0].shape[1]
    cond, options = result.values["7"][0][0][0]
    assert torch.equal(cond, plain.values["7"][0][0][0][0])  # tokens not scaled
    mask = options["attention_mask"]
    size = text_tokens + 16 + 1  # text, 2 images x 8 style tokens, one reference cell
    assert mask.shape == (1, size, size) and mask.dtype == torch.float16
    bias = float(torch.log(torch.tensor(0.5)).half())
    assert torch.all(mask[:, :text_tokens, text_tokens:text_tokens + 16] == bias)
    assert torch.all(mask[:, text_tokens + 16:, text_tokens:text_tokens + 16] == bias)
    assert torch.all(mask[:, :, :text_tokens] == 0)
    assert options["attention_mask_img_shape"] == (1, 1)


def test_attn_bias_at_strength_one_adds_no_mask() -> None:
    tokens = torch.randn(1, 4, TEXT_WIDTH)
    conditioning = [[torch.randn(1, 77, TEXT_WIDTH), {}]]
    out = apply_style(conditioning, tokens, 1.0, "attn_bias")
    assert "attention_mask" not in out[0][1]
    assert torch.equal(out[0][0][:, 77:], tokens)


def test_an_existing_boolean_mask_becomes_a_bias_in_its_quadrants() -> None:
    tokens = torch.randn(1, 2, TEXT_WIDTH)
    old = torch.ones(1, 4, 4, dtype=torch.bool)
    old[0, 0, 3] = False
    conditioning = [[torch.randn(1, 3, TEXT_WIDTH), {"attention_mask": old}]]
    mask = apply_style(conditioning, tokens, 1.0, "multiply")[0][1]["attention_mask"]
    assert mask.shape == (1, 6, 6)
    assert mask[0, 0, 5] == float("-inf")  # the old (text 0 -> reference cell) entry moved
    assert torch.all(mask[:, :, 3:5] == 0)  # log(1) for the style tokens
