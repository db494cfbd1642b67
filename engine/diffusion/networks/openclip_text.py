"""OpenCLIP text towers: ViT-H/14 (SD2) and ViT-bigG/14 (SDXL's clip_g, the refiner's only
encoder), with attribute names that mirror OpenCLIP's checkpoint keys.

Same pre-norm causal transformer as CLIP-L, but exact GELU, q/k/v stacked in one
`in_proj_weight`, and a `text_projection` [width, embed_dim] applied as `x @ P` to the pooled
end-of-text feature.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from engine.diffusion.networks.clip_text import (
    ACTIVATIONS,
    Embedding,
    Fp32LayerNorm,
    TextEncoderConfig,
    TextEncoderOutput,
    init_normal,
    multihead_attention,
    run_layers,
    select_output,
)

VIT_H_CONFIG = TextEncoderConfig(width=1024, layers=24, heads=16, mlp_width=4096,
                                 activation="gelu", projection_dim=1024)
VIT_BIGG_CONFIG = TextEncoderConfig(width=1280, layers=32, heads=20, mlp_width=5120,
                                    activation="gelu", projection_dim=1280)
TINY_OPENCLIP_CONFIG = TextEncoderConfig(width=32, layers=2, heads=2, mlp_width=128,
                                         activation="gelu", projection_dim=24)
# OpenCLIP's initial logit scale, log(1 / 0.07); only kept so the key round-trips.
INITIAL_LOGIT_SCALE = 2.6592


class PackedQkvAttention(nn.Module):
    """nn.MultiheadAttention's parameter layout, q, k, v stacked along dim 0 of in_proj, as
    OpenCLIP's text towers (causal) and the T2I style model (not causal) store it."""

    def __init__(self, width: int, heads: int, *, causal: bool) -> None:
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: Tensor) -> Tensor:
        qkv = nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3*width)
        q, k, v = qkv.chunk(3, dim=-1)
        return self.out_proj(multihead_attention(q, k, v, self.heads, causal=self.causal))


class OpenClipMlp(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.activation = ACTIVATIONS[config.activation]
        self.c_fc = nn.Linear(config.width, config.mlp_width)
        self.c_proj = nn.Linear(config.mlp_width, config.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.activation(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.ln_1 = Fp32LayerNorm(config.width, eps=config.norm_eps)
        self.attn = PackedQkvAttention(config.width, config.heads, causal=True)
        self.ln_2 = Fp32LayerNorm(config.width, eps=config.norm_eps)
        self.mlp = OpenClipMlp(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenClipTransformer(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config)
                                       for _ in range(config.layers))


class OpenClipTextModel(nn.Module):
    """OpenCLIP text tower; state-dict keys are the checkpoint's keys after `...model.`."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        if config.projection_dim is None:
            raise ValueError("an OpenCLIP text tower needs projection_dim (its text_projection "
                             "width); use VIT_H_CONFIG or VIT_BIGG_CONFIG")
        self.config = config
        self.token_embedding = Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length,
                                                             config.width))
        self.transformer = OpenClipTransformer(config)
        self.ln_final = Fp32LayerNorm(config.width, eps=config.norm_eps)
        self.text_projection = nn.Parameter(torch.empty(config.width, config.projection_dim))
        self.logit_scale = nn.Parameter(torch.tensor(INITIAL_LOGIT_SCALE))
        init_normal(self.positional_embedding, std=0.01)
        init_normal(self.text_projection, std=config.width ** -0.5)

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, width) token embeddings (positions not yet added)."""
        return self.token_embedding(tokens)

    def forward(self, tokens: Tensor, *, token_embeds: Tensor | None = None,
                layer_idx: int | None = None, normalize_hidden: bool = True) -> TextEncoderOutput:
        """Encode (B, T) ids; same arguments as ClipTextModel.forward.

        The pooled output is ln_final(last block) at the first end token, times text_projection.
        """
        embeds = self.embed_tokens(tokens) if token_embeds is None else token_embeds
        positions = self.positional_embedding[: tokens.shape[1]]
        x = embeds.to(positions.dtype) + positions  # (B, T, width)
        last_block, chosen = run_layers(x, self.transformer.resblocks, layer_idx)
        hidden, last, pooled = select_output(last_block, chosen, self.ln_final, tokens,
                                             normalize_hidden)
        return TextEncoderOutput(hidden, last, pooled @ self.text_projection)
