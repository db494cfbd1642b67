"""Text encoders against transformers' CLIPTextModel / CLIPTextModelWithProjection loaded with
the same random weights (fp32, max relative error <= 1e-4)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine.diffusion.checkpoints.text_encoders import build_text_encoder, standalone_encoder_state
from engine.diffusion.networks.clip_text import (
    CLIP_L_CONFIG,
    TINY_CLIP_L_CONFIG,
    ClipTextModel,
    Embedding,
    TextEncoderConfig,
)
from engine.diffusion.networks.openclip_text import (
    TINY_OPENCLIP_CONFIG,
    VIT_BIGG_CONFIG,
    VIT_H_CONFIG,
    OpenClipTextModel,
)
from tests.numerics import rel_err


def _transformers():
    """transformers is a test-only reference; tests needing it skip when it is absent."""
    return pytest.importorskip("transformers")

TOLERANCE = 1e-4
TINY_CLIP_L = replace(TINY_CLIP_L_CONFIG, layers=3)
TINY_OPENCLIP = replace(TINY_OPENCLIP_CONFIG, layers=3)


def hf_config(config: TextEncoderConfig):
    return _transformers().CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.width,
        intermediate_size=config.mlp_width, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, max_position_embeddings=config.context_length,
        hidden_act=config.activation, layer_norm_eps=config.norm_eps,
        projection_dim=config.projection_dim or config.width,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def randomize(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Random weights everywhere, LayerNorm scales around 1 (so a swapped norm shows)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * std
            is_norm_scale = name.endswith("weight") and parameter.dim() == 1
            parameter.copy_(noise + 1.0 if is_norm_scale else noise)


def sample_tokens(pad: int, seed: int = 0) -> torch.Tensor:
    """Two 77-token windows: start, content, end, padding (ends at different places)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length in (9, 40):
        content = torch.randint(0, 49406, (length,), generator=generator).tolist()
        row = [49406, *content, 49407]
        rows.append(row + [pad] * (77 - len(row)))
    return torch.tensor(rows)


def openclip_to_hf(state: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """OpenCLIP keys -> HF CLIPTextModelWithProjection keys (written for this test)."""
    layer_names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj":
                   "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    hf = {"text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
          "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
          "text_model.final_layer_norm.weight": state["ln_final.weight"],
          "text_model.final_layer_norm.bias": state["ln_final.bias"],
          "text_projection.weight": state["text_projection"].t()}
    for key, value in state.items():
        if not key.startswith("transformer.resblocks."):
            continue
        index, rest = key.removeprefix("transformer.resblocks.").split(".", 1)
        layer = f"text_model.encoder.layers.{index}."
        if rest.startswith("attn.in_proj_"):
            leaf = rest.removeprefix("attn.in_proj_")
            for part, chunk in zip("qkv", value.split(width, dim=0), strict=True):
                hf[f"{layer}self_attn.{part}_proj.{leaf}"] = chunk
        else:
            module, leaf = rest.rsplit(".", 1)
            hf[f"{layer}{layer_names[module]}.{leaf}"] = value
    return hf


def clip_l_pair(config: TextEncoderConfig, seed: int = 0):
    reference = _transformers().CLIPTextModel(hf_config(config)).eval()
    randomize(reference, seed)
    ours = build_text_encoder("clip_l", standalone_encoder_state(reference.state_dict(),
                                                                 "clip_l"), config=config)
    return ours, reference


def openclip_pair(config: TextEncoderConfig, seed: int = 0):
    ours = OpenClipTextModel(config).eval()
    randomize(ours, seed)
    reference = _transformers().CLIPTextModelWithProjection(hf_config(config)).eval()
    missing, unexpected = reference.load_state_dict(
        openclip_to_hf(ours.state_dict(), config.width), strict=False)
    assert not unexpected and all(key.endswith("position_ids") for key in missing)
    return ours, reference


def check_parity(ours: torch.nn.Module, reference, tokens: torch.Tensor, pooled_name: str) -> None:
    with torch.no_grad():
        expected = reference(input_ids=tokens, output_hidden_states=True)
        # transformers 5's CLIPTextModel has no `text_model` wrapper; WithProjection does
        final_norm = getattr(reference, "text_model", reference).final_layer_norm
        cases = {
            "last layer (normed)": (ours(tokens).hidden, expected.last_hidden_state),
            "skip -2 (no norm)": (ours(tokens, layer_idx=-2, normalize_hidden=False).hidden,
                                  expected.hidden_states[-2]),
            "skip -2 (normed)": (ours(tokens, layer_idx=-2).hidden,
                                 final_norm(expected.hidden_states[-2])),
            "skip -3 (no norm)": (ours(tokens, layer_idx=-3, normalize_hidden=False).hidden,
                                  expected.hidden_states[-3]),
            "last block (no norm)": (ours(tokens, layer_idx=-1, normalize_hidden=False).hidden,
                                     expected.hidden_states[-1]),
            "pooled": (ours(tokens).pooled, getattr(expected, pooled_name)),
        }
    for name, (mine, theirs) in cases.items():
        assert mine.shape == theirs.shape, name
        assert rel_err(mine, theirs) <= TOLERANCE, f"{name}: {rel_err(mine, theirs)}"


def test_clip_l_matches_transformers() -> None:
    ours, reference = clip_l_pair(TINY_CLIP_L)
    check_parity(ours, reference, sample_tokens(pad=49407), "pooler_output")


def test_openclip_matches_transformers_with_projection() -> None:
    ours, reference = openclip_pair(TINY_OPENCLIP)
    check_parity(ours, reference, sample_tokens(pad=0), "text_embeds")


def test_pooled_uses_the_first_end_token() -> None:
    ours, _ = clip_l_pair(TINY_CLIP_L)
    tokens = sample_tokens(pad=49407)
    with torch.no_grad():
        out = ours(tokens)
    assert torch.equal(out.pooled[0], out.last[0, 10])
    assert torch.equal(out.pooled[1], out.last[1, 41])


def test_token_embeds_override_the_lookup() -> None:
    ours, _ = clip_l_pair(TINY_CLIP_L)
    tokens = sample_tokens(pad=49407)
    with torch.no_grad():
        assert torch.equal(ours(tokens, token_embeds=ours.embed_tokens(tokens)).hidden,
                           ours(tokens).hidden)


def test_out_of_range_layer_is_an_error() -> None:
    ours, _ = clip_l_pair(TINY_CLIP_L)
    with pytest.raises(ValueError, match="layer_idx -4"):
        ours(sample_tokens(pad=49407), layer_idx=-4)


def test_bfloat16_stays_close_to_float32() -> None:
    ours, _ = openclip_pair(TINY_OPENCLIP)
    tokens = sample_tokens(pad=0)
    with torch.no_grad():
        full = ours(tokens)
        half = ours.to(torch.bfloat16)(tokens)
    assert half.hidden.dtype == torch.bfloat16
    assert rel_err(half.hidden.float(), full.hidden) < 3e-2
    assert rel_err(half.pooled.float(), full.pooled) < 3e-2


def test_embeddings_start_from_the_random_weights_torch_gives() -> None:
    torch.manual_seed(3)
    ours = Embedding(10, 4, padding_idx=1)
    torch.manual_seed(3)
    assert torch.equal(ours.weight, torch.nn.Embedding(10, 4, padding_idx=1).weight)


def test_encoders_built_on_the_meta_device_draw_no_random_weights(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A meta normal_ is a Python decomposition whose first use imports torch._dynamo: 1-2 s
    of a cold load, for values the file's weights replace."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("normal_ drawn on the meta device")

    monkeypatch.setattr(torch.Tensor, "normal_", refuse)
    with torch.device("meta"):
        ClipTextModel(TINY_CLIP_L)
        OpenClipTextModel(TINY_OPENCLIP)


@pytest.mark.slow
def test_full_size_clip_l_matches_transformers() -> None:
    ours, reference = clip_l_pair(CLIP_L_CONFIG)
    check_parity(ours, reference, sample_tokens(pad=49407), "pooler_output")


@pytest.mark.slow
@pytest.mark.parametrize("config", [VIT_H_CONFIG, VIT_BIGG_CONFIG], ids=["vit_h", "vit_bigg"])
def test_full_size_openclip_matches_transformers(config: TextEncoderConfig) -> None:
    ours, reference = openclip_pair(config)
    check_parity(ours, reference, sample_tokens(pad=0), "text_embeds")
