"""CLIP ViT-L/14 text encoder (SD1, SDXL's clip_l) in HuggingFace `CLIPTextModel` naming, and
the pieces the OpenCLIP encoders share with it (config, fp32 LayerNorm, causal attention).

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision":
a pre-norm causal transformer over 77 tokens; the sequence feature is the final-normed state
at the end-of-text token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

END_TOKEN = 49407


@dataclass(frozen=True)
class TextEncoderConfig:
    """Shape of a CLIP-family text transformer."""

    width: int
    layers: int
    heads: int
    mlp_width: int
    activation: str  # "quick_gelu" (OpenAI CLIP-L) or "gelu" (OpenCLIP ViT-H/bigG)
    projection_dim: int | None = None  # OpenCLIP text_projection output width
    vocab_size: int = 49408
    context_length: int = 77
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.heads < 1 or self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}; "
                             "pick a head count that divides the width")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; use one of "
                             f"{sorted(ACTIVATIONS)}")


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"quick_gelu": quick_gelu, "gelu": F.gelu}

CLIP_L_CONFIG = TextEncoderConfig(width=768, layers=12, heads=12, mlp_width=3072,
                                  activation="quick_gelu")
TINY_CLIP_L_CONFIG = TextEncoderConfig(width=32, layers=2, heads=2, mlp_width=64,
                                       activation="quick_gelu")


class TextEncoderOutput(NamedTuple):
    hidden: Tensor  # (B, T, width) the selected layer, final-normed if asked
    last: Tensor  # (B, T, width) last layer after the final LayerNorm
    pooled: Tensor  # (B, width) or (B, projection_dim): `last` at the first end token


def init_normal(tensor: Tensor, std: float = 1.0) -> None:
    """Normal random init, skipped on the meta device (a module built there to take a file's
    weights by assignment): PyTorch's meta `normal_` is a Python decomposition whose first use
    imports torch._dynamo, 1-2 s of a cold load spent on values that are thrown away."""
    if not tensor.is_meta:
        with torch.no_grad():
            tensor.normal_(0.0, std)


class Embedding(nn.Embedding):
    """nn.Embedding (same parameter, same state_dict key) initialised by `init_normal`."""

    def reset_parameters(self) -> None:
        init_normal(self.weight)
        self._fill_padding_idx_with_zero()


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the weights' dtype (stable in bf16/fp16)."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


def multihead_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, *, causal: bool) -> Tensor:
    """Multi-head attention of (B, T, width) projections -> (B, T, width); `causal` masks the
    future (text towers), without it every token sees every other (vision, style model)."""
    batch, tokens, width = q.shape

    def split(t: Tensor) -> Tensor:
        return t.view(batch, tokens, heads, width // heads).transpose(1, 2)  # (B, heads, T, d)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=causal)
    return out.transpose(1, 2).reshape(batch, tokens, width)  # (B, T, width)


def resolve_layer_index(layer_idx: int, layer_count: int) -> int:
    """A 0-based layer index from ComfyUI's form (-1 = last layer's output, -2 = the one before)."""
    if not -layer_count <= layer_idx < layer_count:
        raise ValueError(f"layer_idx {layer_idx} is outside this {layer_count}-layer encoder; "
                         f"use -1 .. -{layer_count} (or 0 .. {layer_count - 1})")
    return layer_idx % layer_count


def run_layers(x: Tensor, layers: nn.ModuleList, layer_idx: int | None) -> tuple[Tensor, Tensor]:
    """Run the blocks; returns (last output, output of block `layer_idx` or the last)."""
    chosen_index = len(layers) - 1 if layer_idx is None else resolve_layer_index(
        layer_idx, len(layers))
    chosen = x
    for index, layer in enumerate(layers):
        x = layer(x)
        if index == chosen_index:
            chosen = x
    return x, chosen


def end_positions(tokens: Tensor) -> Tensor:
    """Index of the first end-of-text token in each row of (B, T) ids."""
    is_end = tokens == END_TOKEN
    if not bool(is_end.any(dim=1).all()):
        raise ValueError(f"every token row needs an end token {END_TOKEN}; tokenize prompts "
                         "with ClipTokenizer, which closes every window with one")
    return is_end.int().argmax(dim=1)


def select_output(last_block: Tensor, chosen: Tensor, final_norm: nn.Module, tokens: Tensor,
                  normalize_hidden: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(hidden, last, pooled-before-projection) from the raw last and chosen block outputs."""
    last = final_norm(last_block)
    hidden = final_norm(chosen) if normalize_hidden else chosen
    pooled = last[torch.arange(last.shape[0], device=last.device), end_positions(tokens)]
    return hidden, last, pooled


class ClipAttention(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.q_proj = nn.Linear(config.width, config.width)
        self.k_proj = nn.Linear(config.width, config.width)
        self.v_proj = nn.Linear(config.width, config.width)
        self.out_proj = nn.Linear(config.width, config.width)

    def forward(self, x: Tensor) -> Tensor:
        out = multihead_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads,
                                  causal=True)
        return self.out_proj(out)


class ClipMlp(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.activation = ACTIVATIONS[config.activation]
        self.fc1 = nn.Linear(config.width, config.mlp_width)
        self.fc2 = nn.Linear(config.mlp_width, config.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class ClipLayer(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.layer_norm1 = Fp32LayerNorm(config.width, eps=config.norm_eps)
        self.self_attn = ClipAttention(config)
        self.layer_norm2 = Fp32LayerNorm(config.width, eps=config.norm_eps)
        self.mlp = ClipMlp(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(config) for _ in range(config.layers))


class ClipEmbeddings(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.token_embedding = Embedding(config.vocab_size, config.width)
        self.position_embedding = Embedding(config.context_length, config.width)


class ClipTextModel(nn.Module):
    """CLIP-L text tower; state-dict keys are HF's `text_model.*` keys without `text_model.`."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = ClipEmbeddings(config)
        self.encoder = ClipEncoder(config)
        self.final_layer_norm = Fp32LayerNorm(config.width, eps=config.norm_eps)

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, width) token embeddings (positions not yet added)."""
        return self.embeddings.token_embedding(tokens)

    def forward(self, tokens: Tensor, *, token_embeds: Tensor | None = None,
                layer_idx: int | None = None, normalize_hidden: bool = True) -> TextEncoderOutput:
        """Encode (B, T) ids; `token_embeds` replaces their embeddings (textual inversion).

        `layer_idx` picks the hidden state (ComfyUI clip skip: -1 last block, -2 the one
        before; None = the last); `normalize_hidden` applies the final LayerNorm to it.
        """
        embeds = self.embed_tokens(tokens) if token_embeds is None else token_embeds
        # through the module, so weights held in a storage dtype come cast (cast_on_use.py)
        positions = self.embeddings.position_embedding(
            torch.arange(tokens.shape[1], device=tokens.device))
        x = embeds.to(positions.dtype) + positions  # (B, T, width)
        last_block, chosen = run_layers(x, self.encoder.layers, layer_idx)
        hidden, last, pooled = select_output(last_block, chosen, self.final_layer_norm, tokens,
                                             normalize_hidden)
        return TextEncoderOutput(hidden, last, pooled)
