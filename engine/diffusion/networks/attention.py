"""The UNet's transformer part (LDM `SpatialTransformer`): self- and cross-attention over the
pixels of a feature map, with attribute names that mirror the checkpoint keys.

A `UNetCall` (unet_patches.py) passed down runs a MODEL's attention patch points; without one,
or when it has none, the blocks take their plain path."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from engine.diffusion.kernels import native_attention
from engine.diffusion.networks.unet_patches import (
    AttentionInputPatch,
    AttentionReplace,
    BlockId,
    TransformerId,
    TransformerOptions,
    UNetCall,
)

# LDM: the transformer's GroupNorm uses eps 1e-6 (the ResBlocks keep torch's default 1e-5).
TRANSFORMER_NORM_EPS = 1e-6
NORM_GROUPS = 32


class CrossAttention(nn.Module):
    """Multi-head attention of `x` over `context` (over `x` itself when context is None)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        # checkpoint key `to_out.0`; LDM's index 1 is a weightless Dropout
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim)])
        # (key context, value context) -> new pair, applied to cross-attention's text context;
        # set and unset by a patch (hypernetworks, engine/diffusion/patches/hypernetwork.py)
        self.context_hook: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    def forward(self, x: Tensor, context: Tensor | None = None,
                value: Tensor | None = None) -> Tensor:
        """Attention of x over context (x itself when None); values from `value` when given."""
        key_source = x if context is None else context
        value_source = key_source if value is None else value
        if context is not None and self.context_hook is not None:
            key_source, value_source = self.context_hook(key_source, value_source)
        return self.to_out[0](self.attend(self.to_q(x), self.to_k(key_source),
                                          self.to_v(value_source)))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Scaled dot-product attention of projected (B, T, heads * dim_head) q, k, v; the
        result has q's shape, before to_out.

        When a patch regrouped q into more, shorter sequences (HyperTile's tiles) and left k
        and v whole, k and v are split into as many runs of consecutive tokens: the reading
        ComfyUI's attention gives such inputs, which patches written for it rely on."""
        batch, tokens, _ = q.shape
        if k.shape[0] != batch:
            k, v = _follow_batch(k, batch), _follow_batch(v, batch)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        if native_attention.supports(q, k, v):  # bf16 on a CPU with AVX512-BF16
            out = native_attention.attention(q, k, v)  # (B, heads, T, dim_head)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(batch, tokens, -1)  # (B, T, heads * dim_head)

    def _split_heads(self, t: Tensor) -> Tensor:
        batch, tokens, inner = t.shape
        heads = self.heads
        return t.view(batch, tokens, heads, inner // heads).transpose(1, 2)  # (B, heads, T, d)


def _follow_batch(t: Tensor, batch: int) -> Tensor:
    """(b, T, C) -> (batch, b * T / batch, C), consecutive tokens kept together."""
    total = t.shape[0] * t.shape[1]
    if batch < t.shape[0] or total % batch:
        raise ValueError(f"attention got q with batch {batch} but k/v of shape "
                         f"{tuple(t.shape)}; a patch must return k and v with q's batch or one "
                         "that divides its token runs evenly")
    return t.reshape(batch, total // batch, t.shape[-1])


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
    """Pre-norm block: self-attention, cross-attention on the text, GEGLU feed-forward.

    With `self_attention=False` (the SD x4 upscaler's high-resolution levels, LDM's
    disable_self_attn) the first attention also attends to the text instead of the pixels."""

    def __init__(self, dim: int, context_dim: int, heads: int, dim_head: int,
                 self_attention: bool = True) -> None:
        super().__init__()
        self.self_attention = self_attention
        self.attn1 = CrossAttention(dim, dim if self_attention else context_dim, heads,
                                    dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, call: UNetCall | None = None) -> Tensor:
        if call is not None and call.patches.touches_attention:
            return self._patched_forward(x, context, call)
        # `out.add_(x)`: x + out into the sublayer's fresh output (x itself is kept for backward)
        first_context = None if self.self_attention else context
        x = self.attn1(self.norm1(x), first_context).add_(x)
        x = self.attn2(self.norm2(x), context).add_(x)
        return self.ff(self.norm3(x)).add_(x)

    def _patched_forward(self, x: Tensor, context: Tensor, call: UNetCall) -> Tensor:
        """The same block with the call's attention points run where ComfyUI runs them; no
        in-place adds, since a patch may hand back a tensor it keeps."""
        patches = call.patches
        options = {**call.options, "n_heads": self.attn1.heads,
                   "dim_head": self.attn1.dim_head, "attn_precision": None}
        keys = _replace_keys(options)
        first_context = None if self.self_attention else context
        n = _patched_attention(self.attn1, self.norm1(x), first_context, patches.attn1_patch,
                               _replacement(patches.attn1_replace, keys), options)
        for patch in patches.attn1_output_patch:
            n = patch(n, options)
        x = x + n
        for patch in patches.middle_patch:
            x = patch(x, options)
        n = _patched_attention(self.attn2, self.norm2(x), context, patches.attn2_patch,
                               _replacement(patches.attn2_replace, keys), options)
        for patch in patches.attn2_output_patch:
            n = patch(n, options)
        x = x + n
        return x + self.ff(self.norm3(x))


def _replace_keys(options: TransformerOptions) -> tuple[TransformerId | BlockId, ...]:
    """The keys an attention replacement may be stored under, most specific first."""
    block = options.get("block")
    if block is None:
        return ()
    return ((block[0], block[1], options.get("block_index", 0)), (block[0], block[1]))


def _replacement(table: Mapping[BlockId | TransformerId, AttentionReplace],
                 keys: tuple[TransformerId | BlockId, ...]) -> AttentionReplace | None:
    if not table:
        return None
    return next((table[key] for key in keys if key in table), None)


def _patched_attention(attention: CrossAttention, n: Tensor, context: Tensor | None,
                       input_patches: tuple[AttentionInputPatch, ...],
                       replace: AttentionReplace | None, options: TransformerOptions) -> Tensor:
    """attn1 (context None) or attn2 with ComfyUI's input patches and optional replacement."""
    value = None
    if input_patches:
        context = n if context is None else context
        value = context
        for patch in input_patches:
            n, context, value = patch(n, context, value, options)
    if replace is None:
        return attention(n, context, value)
    context = n if context is None else context
    value = context if value is None else value
    out = replace(attention.to_q(n), attention.to_k(context), attention.to_v(value), options)
    return attention.to_out[0](out)


class SpatialTransformer(nn.Module):
    """Runs transformer blocks over the H*W pixels of a feature map, with a residual around all.

    `use_linear` picks SD2/SDXL's Linear proj_in/proj_out (applied on tokens) over SD1's 1x1
    convs (applied on the map); both are the same per-pixel affine map, stored differently.
    """

    def __init__(self, channels: int, context_dim: int, heads: int, dim_head: int, depth: int,
                 use_linear: bool, self_attention: bool = True) -> None:
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
            BasicTransformerBlock(inner_dim, context_dim, heads, dim_head, self_attention)
            for _ in range(depth))

    def forward(self, x: Tensor, context: Tensor, call: UNetCall | None = None) -> Tensor:
        batch, _, height, width = x.shape
        if call is not None:
            call.options["activations_shape"] = list(x.shape)
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # (B, H*W, C); a free view for channels_last maps
        if self.use_linear:
            h = self.proj_in(h)
        for index, block in enumerate(self.transformer_blocks):
            if call is not None:
                call.options["block_index"] = index
            h = block(h, context, call)
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

