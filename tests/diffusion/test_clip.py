"""TextEncoderStack: ComfyUI's encode_from_tokens (windows, weights, pooled, clip skip, SDXL)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import torch

from engine.diffusion.networks.clip_text import TINY_CLIP_L_CONFIG, ClipTextModel
from engine.diffusion.networks.openclip_text import TINY_OPENCLIP_CONFIG, OpenClipTextModel
from engine.diffusion.text.encoding import TextEncoderStack, window_inputs
from engine.diffusion.text.prompt_weights import EmbeddingFolders
from engine.diffusion.text.tokenizer import END_TOKEN, ClipBpe

TINY_L = replace(TINY_CLIP_L_CONFIG, layers=3)
TINY_G = replace(TINY_OPENCLIP_CONFIG, layers=3, width=48, heads=3)


@pytest.fixture(scope="module")
def bpe() -> ClipBpe:
    return ClipBpe.load()


def _random(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * 0.05
            parameter.copy_(noise + 1.0 if parameter.dim() == 1 and "weight" in name else noise)
    return module.eval()


@pytest.fixture(scope="module")
def clip_l() -> ClipTextModel:
    return _random(ClipTextModel(TINY_L), seed=1)


@pytest.fixture(scope="module")
def clip_g() -> OpenClipTextModel:
    return _random(OpenClipTextModel(TINY_G), seed=2)


def _ids(stack: TextEncoderStack, name: str, text: str) -> torch.Tensor:
    windows = stack.tokenize(text).windows[name]
    return torch.tensor([[token for token, _ in window] for window in windows])


def _run(model: torch.nn.Module, ids: torch.Tensor, **options) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **options)


def test_sd1_encode_gives_77_tokens_and_unprojected_pooled(bpe, clip_l) -> None:
    stack = TextEncoderStack("sd1", {"l": clip_l}, bpe)
    cond, pooled, warnings = stack.encode("a photo of a cat")
    assert cond.shape == (1, 77, 32) and pooled.shape == (1, 32)
    assert cond.dtype == torch.float32 and warnings == ()
    reference = _run(clip_l, _ids(stack, "l", "a photo of a cat"))
    assert torch.allclose(cond[0], reference.last[0], atol=1e-6)  # SD1: last layer, normed
    assert torch.allclose(pooled, reference.pooled, atol=1e-6)


def test_long_prompt_concatenates_window_encodings(bpe, clip_l) -> None:
    stack = TextEncoderStack("sd1", {"l": clip_l}, bpe)
    cond, pooled, _ = stack.encode("cat " * 200)
    ids = _ids(stack, "l", "cat " * 200)
    assert ids.shape == (3, 77) and cond.shape == (1, 3 * 77, 32)
    reference = _run(clip_l, ids)
    assert torch.allclose(cond[0], reference.last.reshape(-1, 32), atol=1e-6)
    assert torch.allclose(pooled[0], reference.pooled[0], atol=1e-6)  # the first window


def test_weights_move_tokens_away_from_the_empty_prompt(bpe, clip_l) -> None:
    stack = TextEncoderStack("sd1", {"l": clip_l}, bpe)
    cond, pooled, _ = stack.encode("a (cat:1.5) ((photo))")
    z = _run(clip_l, _ids(stack, "l", "a cat photo")).last[0]
    z_empty = _run(clip_l, _ids(stack, "l", "")).last[0]
    expected = z.clone()
    expected[2] = (z[2] - z_empty[2]) * 1.5 + z_empty[2]  # cat
    expected[3] = (z[3] - z_empty[3]) * (1.1 * 1.1) + z_empty[3]  # photo
    assert torch.allclose(cond[0], expected, atol=1e-5)
    assert torch.allclose(cond[0, [0, 1, 4, 5]], z[[0, 1, 4, 5]], atol=1e-6)
    assert torch.allclose(pooled[0], _run(clip_l, _ids(stack, "l", "a cat photo")).pooled[0],
                          atol=1e-6)  # weights never touch the pooled vector


def test_weight_one_everywhere_skips_the_empty_prompt(bpe, clip_l) -> None:
    stack = TextEncoderStack("sd1", {"l": clip_l}, bpe)
    weighted = stack.encode("(cat:1.0) photo").cond
    assert torch.equal(weighted, stack.encode("cat photo").cond)


def test_weights_apply_per_window(bpe, clip_l) -> None:
    stack = TextEncoderStack("sd1", {"l": clip_l}, bpe)
    prompt = "dog " * 75 + "(cat:2)"
    cond = stack.encode(prompt).cond
    z = _run(clip_l, _ids(stack, "l", "dog " * 75 + "cat")).last
    z_empty = _run(clip_l, _ids(stack, "l", "")).last[0]
    assert torch.allclose(cond[0, :77], z[0], atol=1e-6)
    assert torch.allclose(cond[0, 78], (z[1, 1] - z_empty[1]) * 2 + z_empty[1], atol=1e-5)


@pytest.mark.parametrize(("family", "layer_idx", "expected"), [
    ("sd1", None, {"l": (None, True)}),
    ("sd1", -2, {"l": (-2, True)}),
    ("sd2", None, {"h": (-2, True)}),
    ("sd2", -1, {"h": (-1, True)}),
    ("sdxl", None, {"l": (-2, False), "g": (-2, False)}),
    ("sdxl", -1, {"l": (-1, False), "g": (-1, False)}),
    ("sdxl", -3, {"l": (-3, False), "g": (-3, False)}),
    ("sdxl_refiner", None, {"g": (-2, False)}),
    ("sd1", -24, {"l": (None, True)}),  # deeper than the encoder: the normed last layer
])
def test_layer_choice_follows_comfyui(bpe, clip_l, clip_g, family, layer_idx, expected) -> None:
    models = {"l": clip_l, "g": clip_g, "h": _random(OpenClipTextModel(TINY_G), seed=3)}
    stack = TextEncoderStack(family, {name: models[name] for name in expected}, bpe,
                             layer_idx=layer_idx)
    for spec in stack.spec.encoders:
        assert stack.layer_choice(spec) == expected[spec.name]


def test_clip_skip_selects_the_normed_penultimate_layer_on_sd1(bpe, clip_l) -> None:
    stack = TextEncoderStack("sd1", {"l": clip_l}, bpe).clone_with_layer(-2)
    reference = _run(clip_l, _ids(stack, "l", "a cat"), layer_idx=-2).hidden
    assert torch.allclose(stack.encode("a cat").cond[0], reference[0], atol=1e-6)


def test_clone_with_layer_leaves_the_original_alone(bpe, clip_l) -> None:
    stack = TextEncoderStack("sd1", {"l": clip_l}, bpe)
    clone = stack.clone_with_layer(-2)
    assert stack.layer_idx is None and clone.layer_idx == -2
    assert clone.encoders["l"] is stack.encoders["l"]
    assert not torch.equal(clone.encode("a cat").cond, stack.encode("a cat").cond)


def test_sdxl_concatenates_l_then_g_and_pools_from_g(bpe, clip_l, clip_g) -> None:
    stack = TextEncoderStack("sdxl", {"l": clip_l, "g": clip_g}, bpe)
    cond, pooled, _ = stack.encode("a photo of a cat")
    assert cond.shape == (1, 77, 32 + 48) and pooled.shape == (1, 24)
    l_ref = _run(clip_l, _ids(stack, "l", "a photo of a cat"), layer_idx=-2,
                 normalize_hidden=False)
    g_ref = _run(clip_g, _ids(stack, "g", "a photo of a cat"), layer_idx=-2,
                 normalize_hidden=False)
    assert torch.allclose(cond[0, :, :32], l_ref.hidden[0], atol=1e-6)
    assert torch.allclose(cond[0, :, 32:], g_ref.hidden[0], atol=1e-6)
    assert torch.allclose(pooled, g_ref.pooled, atol=1e-6)


def test_sdxl_encoders_pad_differently(bpe, clip_l, clip_g) -> None:
    stack = TextEncoderStack("sdxl", {"l": clip_l, "g": clip_g}, bpe)
    tokens = stack.tokenize("a cat")
    assert tokens.windows["l"][0][-1] == (END_TOKEN, 1.0)
    assert tokens.windows["g"][0][-1] == (0, 1.0)


def test_sdxl_separate_texts_pad_the_shorter_with_empty_windows(bpe, clip_l, clip_g) -> None:
    stack = TextEncoderStack("sdxl", {"l": clip_l, "g": clip_g}, bpe)
    tokens = stack.tokenize_per_encoder({"g": "cat " * 100, "l": "a dog"})
    assert len(tokens.windows["g"]) == 2 and len(tokens.windows["l"]) == 2
    assert tokens.windows["l"][1] == stack.tokenize("").windows["l"][0]
    assert stack.encode_tokens(tokens).cond.shape == (1, 154, 80)


def test_per_encoder_texts_must_name_the_encoders(bpe, clip_l) -> None:
    stack = TextEncoderStack("sd1", {"l": clip_l}, bpe)
    with pytest.raises(ValueError, match="encoders \\['l'\\]"):
        stack.tokenize_per_encoder({"g": "x", "l": "y"})


def test_embedding_changes_only_the_input_positions_it_names(bpe, clip_l, tmp_path: Path) -> None:
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(9))
    safetensors.torch.save_file({"emb_params": vectors}, tmp_path / "style.safetensors")
    stack = TextEncoderStack("sd1", {"l": clip_l}, bpe,
                             find_embedding=EmbeddingFolders((tmp_path,)))
    windows = list(stack.tokenize("a embedding:style cat").windows["l"])
    ids, token_embeds = window_inputs(clip_l, windows)
    lookup = clip_l.embed_tokens(ids)
    changed = (token_embeds != lookup).any(dim=-1)[0].nonzero().flatten().tolist()
    assert changed == [2, 3]
    assert torch.equal(token_embeds[0, 2:4], vectors)
    assert stack.encode("a embedding:style cat").cond.shape == (1, 77, 32)


def test_unknown_embedding_warning_reaches_the_caller(bpe, clip_l, clip_g, tmp_path) -> None:
    stack = TextEncoderStack("sdxl", {"l": clip_l, "g": clip_g}, bpe,
                             find_embedding=EmbeddingFolders((tmp_path,)))
    encoded = stack.encode("a embedding:ghost cat")
    assert len(encoded.warnings) == 1 and "embedding:ghost" in encoded.warnings[0]
    assert encoded.cond.shape == (1, 77, 80)


def test_family_needs_its_encoders(bpe, clip_l) -> None:
    with pytest.raises(ValueError, match="needs encoders \\['l', 'g'\\]"):
        TextEncoderStack("sdxl", {"l": clip_l}, bpe)
    with pytest.raises(ValueError, match="unknown text-encoder family 'sd3'"):
        TextEncoderStack("sd3", {"l": clip_l}, bpe)


def test_sdxl_cuts_to_the_shorter_encoder_like_comfyui(bpe, clip_l, clip_g, tmp_path) -> None:
    # an SD1-width embedding: clip_l takes its 80 vectors (2 windows), clip_g drops it (1)
    safetensors.torch.save_file({"emb_params": torch.randn(80, 32)}, tmp_path / "big.safetensors")
    stack = TextEncoderStack("sdxl", {"l": clip_l, "g": clip_g}, bpe,
                             find_embedding=EmbeddingFolders((tmp_path,)))
    tokens = stack.tokenize("embedding:big")
    assert (len(tokens.windows["l"]), len(tokens.windows["g"])) == (2, 1)
    encoded = stack.encode_tokens(tokens)
    assert encoded.cond.shape == (1, 77, 80)
    assert len(encoded.warnings) == 1 and "width 32" in encoded.warnings[0]
