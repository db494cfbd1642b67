"""The UNet's transformer part (LDM `SpatialTransformer`): self- and cross-attention over the
pixels of a feature map, with attribute names that mirror the checkpoint keys."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from engine.diffusion.kernels import native_attention

# LDM: the transformer's GroupNorm uses eps 1e-6 (the ResBlocks keep torch's default 1e-5).
TRANSFORMER_NORM_EPS = 1e-6
NORM_GROUPS = 32


class CrossAttention(nn.Module):
    """Multi-head attention of `x` over `context` (over `x` itself when context is None)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        # checkpoint key `to_out.0`; LDM's index 1 is a weightless Dropout
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim)])
        # (key context, value context) -> new pair, applied to cross-attention's text context;
        # set and unset by a patch (hypernetworks, engine/diffusion/patches/hypernetwork.py)
        self.context_hook: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        key_source = value_source = x if context is None else context
        if context is not None and self.context_hook is not None:
            key_source, value_source = self.context_hook(context, context)
        batch, tokens, _ = x.shape
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(key_source))
        v = self._split_heads(self.to_v(value_source))
        if native_attention.supports(q, k, v):  # bf16 on a CPU with AVX512-BF16
            out = native_attention.attention(q, k, v)  # (B, heads, T, dim_head)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, tokens, -1)  # (B, T, heads * dim_head)
        return self.to_out[0](out)

    def _split_heads(self, t: Tensor) -> Tensor:
        batch, tokens, inner = t.shape
        heads = self.heads
        return t.view(batch, tokens, heads, inner // heads).transpose(1, 2)  # (B, heads, T, d)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection gives value and gate, out = value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(value)


class FeedForward(nn.Module):
    """GEGLU MLP with a 4x inner width; keys `net.0.proj` and `net.2` (index 1 is Dropout)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        inner_dim = dim * 4
        self.net = nn.ModuleDict({"0": GEGLU(dim, inner_dim), "2": nn.Linear(inner_dim, dim)})

    def forward(self, x: Tensor) -> Tensor:
        return self.net["2"](self.net["0"](x))


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention on the text, GEGLU feed-forward."""

    def __init__(self, dim: int, context_dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        # `out.add_(x)`: x + out into the sublayer's fresh output (x itself is kept for backward)
        x = self.attn1(self.norm1(x)).add_(x)
        x = self.attn2(self.norm2(x), context).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class SpatialTransformer(nn.Module):
    """Runs transformer blocks over the H*W pixels of a feature map, with a residual around all.

    `use_linear` picks SD2/SDXL's Linear proj_in/proj_out (applied on tokens) over SD1's 1x1
    convs (applied on the map); both are the same per-pixel affine map, stored differently.
    """

    def __init__(self, channels: int, context_dim: int, heads: int, dim_head: int, depth: int,
                 use_linear: bool) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(NORM_GROUPS, channels, eps=TRANSFORMER_NORM_EPS)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(channels, inner_dim)
            self.proj_out: nn.Module = nn.Linear(inner_dim, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, context_dim, heads, dim_head) for _ in range(depth))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # (B, H*W, C); a free view for channels_last maps
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = _tokens_to_map(h, batch, height, width)  # (B, C, H, W)
        if not self.use_linear:
            h = self.proj_out(h)
        return h.add_(x)


def _tokens_to_map(tokens: Tensor, batch: int, height: int, width: int) -> Tensor:
    """(B, H*W, C) -> (B, C, H, W) as a channels_last view, so no copy is made."""
    channels = tokens.shape[-1]
    return tokens.reshape(batch, height, width, channels).permute(0, 3, 1, 2)

