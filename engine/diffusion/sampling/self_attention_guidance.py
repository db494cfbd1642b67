"""Self-Attention Guidance (Hong et al. 2023, "Improving Sample Quality of Diffusion Models Using
Self-Attention Guidance"): the negative prediction is blurred where the middle block's first
self-attention of the negative pass attends most, the model is run again on that degraded
latent, and the guided result is pushed away from what it predicts there."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

SAG_THRESHOLD = 1.0  # attention mass above which a pixel counts as attended to
BLUR_KERNEL = 9
MIN_SIDE = 4  # latents this small on a side are left alone (no room for the blur's padding)


def attention_with_probabilities(q: Tensor, k: Tensor, v: Tensor, heads: int
                                 ) -> tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(d)) v over (B, T, heads * d) inputs, computed in float32; returns
    the output (B, T, heads * d) and the probabilities (B * heads, T, T)."""
    batch, tokens, inner = q.shape
    dim_head = inner // heads

    def split(t: Tensor) -> Tensor:
        return t.reshape(batch, -1, heads, dim_head).permute(0, 2, 1, 3).reshape(
            batch * heads, -1, dim_head)

    q_heads, k_heads, v_heads = split(q), split(k), split(v)
    scores = torch.bmm(q_heads.float(), k_heads.float().transpose(1, 2)) * dim_head**-0.5
    probabilities = scores.softmax(dim=-1)
    out = torch.bmm(probabilities.to(v.dtype), v_heads)  # (B * heads, T, d)
    out = out.reshape(batch, heads, tokens, dim_head).permute(0, 2, 1, 3).reshape(batch, tokens,
                                                                                  inner)
    return out, probabilities


def gaussian_blur(image: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """A separable Gaussian blur per channel, reflect-padded to keep the size."""
    half = (kernel_size - 1) * 0.5
    steps = torch.linspace(-half, half, steps=kernel_size)
    density = torch.exp(-0.5 * (steps / sigma).pow(2))
    kernel_1d = (density / density.sum()).to(device=image.device, dtype=image.dtype)
    kernel = torch.mm(kernel_1d[:, None], kernel_1d[None, :])
    kernel = kernel.expand(image.shape[-3], 1, kernel_size, kernel_size)
    padding = [kernel_size // 2] * 4
    return F.conv2d(F.pad(image, padding, mode="reflect"), kernel, groups=image.shape[-3])


def _closest_factors(count: int) -> tuple[int, int]:
    for low in range(int(math.sqrt(count)), 0, -1):
        if count % low == 0:
            return low, count // low
    return 1, count


def blur_where_attended(x0: Tensor, probabilities: Tensor, sigma: float,
                        threshold: float = SAG_THRESHOLD) -> Tensor:
    """x0 blurred where the head-averaged attention each token receives exceeds `threshold`."""
    _, queries, keys = probabilities.shape
    batch, _, height, width = x0.shape
    attention = probabilities.reshape(batch, -1, queries, keys)
    attended = attention.mean(1).sum(1) > threshold  # (B, T): mass received per token
    factors = _closest_factors(queries)
    map_height = max(factors) if height > width else min(factors)
    map_width = factors[1] if map_height == factors[0] else factors[0]
    mask = attended.reshape(batch, map_height, map_width).unsqueeze(1).to(attention.dtype)
    mask = F.interpolate(mask, (height, width)).to(x0.dtype)
    blurred = gaussian_blur(x0, BLUR_KERNEL, sigma)
    return blurred * mask + x0 * (1 - mask)


@dataclass(eq=False)
class SelfAttentionGuidance:
    """The middle block's first self-attention replaced by one that keeps the negative pass's
    probabilities (`record`), and the post-CFG function using them (`post_cfg`)."""

    scale: float
    blur_sigma: float
    probabilities: Tensor | None = field(default=None, repr=False)

    def record(self, q: Tensor, k: Tensor, v: Tensor, options: dict[str, Any]) -> Tensor:
        heads, sides = options["n_heads"], options["cond_or_uncond"]
        out, probabilities = attention_with_probabilities(q, k, v, heads)
        if 1 in sides:  # the negative pass: its probabilities are the ones SAG reads
            per_side = heads * (q.shape[0] // len(sides))
            start = per_side * sides.index(1)
            self.probabilities = probabilities[start:start + per_side]
        return out

    def post_cfg(self, args: dict[str, Any]) -> Tensor:
        guided = args["denoised"]
        if min(guided.shape[2:]) <= MIN_SIDE or self.probabilities is None:
            return guided
        uncond_x0, x = args["uncond_denoised"], args["input"]
        degraded = blur_where_attended(uncond_x0, self.probabilities, self.blur_sigma)
        degraded_noisy = degraded + x - uncond_x0
        (prediction,) = args["model"].calc_cond_batch([args["uncond"]], degraded_noisy,
                                                      args["sigma"], args["model_options"])
        return guided + (degraded - prediction) * self.scale
