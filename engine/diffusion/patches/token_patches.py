"""Self-attention patches that regroup the tokens: HyperTile (tfernd's HyperTile: attention within
random tiles) and ToMe (Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion"). Each
is an attn1_patch / attn1_output_patch pair sharing the state of the call in between."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
from torch import Tensor

Options = dict[str, Any]
LATENT_CELL = 8  # pixels per latent cell: HyperTile's tile size is given in pixels
MIN_TILE_PIXELS = 32


def random_divisor(value: int, min_value: int, max_options: int, counter: int) -> int:
    """value // d for one of the `max_options` smallest divisors d >= min_value of value, picked
    by a generator seeded with `counter` (HyperTile's tile count along one side)."""
    min_value = min(min_value, value)
    divisors = [d for d in range(min_value, value + 1) if value % d == 0]
    counts = [value // d for d in divisors[:max_options]]
    return counts[random.Random(counter).randint(0, len(counts) - 1)]


@cache
def hw_for_tokens(tokens: int, aspect_ratio: float) -> tuple[int, int]:
    """(h, w) with h * w = tokens closest to w / h = aspect_ratio."""
    h, w = round(math.sqrt(tokens * aspect_ratio)), round(math.sqrt(tokens / aspect_ratio))
    if h * w == tokens:
        return h, w
    if (tokens / h).is_integer():
        return h, tokens // h
    if (tokens / w).is_integer():
        return tokens // w, w
    pairs = [(d, tokens // d) for d in range(2, tokens + 1) if tokens % d == 0]
    return min(pairs, key=lambda pair: abs(pair[1] / pair[0] - aspect_ratio))


@dataclass(eq=False)
class HyperTile:
    """Self-attention at the first `max_depth` + 1 resolutions runs within tiles of about
    `tile_size` pixels (bigger at depth with `scale_depth`), tiles picked among `swap_size`
    choices per call."""

    tile_size: int
    swap_size: int
    max_depth: int
    scale_depth: bool
    counter: int = 1
    tiles: tuple[int, int, int, int] | None = field(default=None, repr=False)

    def split(self, n: Tensor, context: Tensor, value: Tensor, options: Options) -> Any:
        shape = options["original_shape"]
        levels = [(shape[-2] / 2**depth) * (shape[-1] / 2**depth)
                  for depth in range(self.max_depth + 1)]
        if n.shape[-2] not in levels:
            return n, context, value
        h, w = hw_for_tokens(n.shape[1], shape[-1] / shape[-2])
        factor = 2 ** levels.index(n.shape[-2]) if self.scale_depth else 1
        tile = max(MIN_TILE_PIXELS, self.tile_size) // LATENT_CELL * factor
        rows = random_divisor(h, tile, self.swap_size, self.counter)
        cols = random_divisor(w, tile, self.swap_size, self.counter + 1)
        self.counter += 2
        if rows * cols > 1:
            batch, _, channels = n.shape
            n = (n.view(batch, rows, h // rows, cols, w // cols, channels)
                 .permute(0, 1, 3, 2, 4, 5).reshape(batch * rows * cols, -1, channels))
            self.tiles = (rows, cols, h, w)
        return n, context, value

    def join(self, out: Tensor, options: Options) -> Tensor:
        if self.tiles is None:
            return out
        rows, cols, h, w = self.tiles
        self.tiles = None
        channels = out.shape[-1]
        batch = out.shape[0] // (rows * cols)
        return (out.view(batch, rows, cols, h // rows, w // cols, channels)
                .permute(0, 1, 3, 2, 4, 5).reshape(batch, h * w, channels))


def bipartite_matching(metric: Tensor, w: int, h: int, stride: int, r: int,
                       generator: torch.Generator) -> tuple[Callable[[Tensor], Tensor],
                                                            Callable[[Tensor], Tensor]]:
    """ToMe's random 2D bipartite soft matching: one random token per stride x stride cell is a
    destination, the r sources most similar (cosine) to a destination are averaged into it.
    Returns (merge, unmerge)."""
    batch, tokens, _ = metric.shape
    if r <= 0 or w == 1 or h == 1:
        return _same, _same
    cells_h, cells_w = h // stride, w // stride
    choice = torch.randint(stride * stride, (cells_h, cells_w, 1), generator=generator)
    marks = torch.zeros(cells_h, cells_w, stride * stride, dtype=torch.int64)
    marks.scatter_(2, choice, -torch.ones_like(choice))
    marks = marks.view(cells_h, cells_w, stride, stride).transpose(1, 2)
    marks = marks.reshape(cells_h * stride, cells_w * stride)
    if marks.shape != (h, w):  # cells beyond the last whole stride stay sources
        padded = torch.zeros(h, w, dtype=torch.int64)
        padded[:marks.shape[0], :marks.shape[1]] = marks
        marks = padded
    order = marks.reshape(1, -1, 1).argsort(dim=1).to(metric.device)  # destinations first
    destinations = cells_h * cells_w
    src_index, dst_index = order[:, destinations:], order[:, :destinations]

    def split(x: Tensor) -> tuple[Tensor, Tensor]:
        channels = x.shape[-1]
        return (torch.gather(x, 1, src_index.expand(batch, tokens - destinations, channels)),
                torch.gather(x, 1, dst_index.expand(batch, destinations, channels)))

    with torch.no_grad():
        sources, targets = split(metric / metric.norm(dim=-1, keepdim=True))
        best, best_target = (sources @ targets.transpose(-1, -2)).max(dim=-1)
        r = min(sources.shape[1], r)
        ranked = best.argsort(dim=-1, descending=True)[..., None]
        kept, merged = ranked[..., r:, :], ranked[..., :r, :]
        merged_target = torch.gather(best_target[..., None], -2, merged)

    def merge(x: Tensor) -> Tensor:
        src, dst = split(x)
        count, length, channels = src.shape
        unmerged = torch.gather(src, -2, kept.expand(count, length - r, channels))
        src = torch.gather(src, -2, merged.expand(count, r, channels))
        dst = dst.scatter_reduce(-2, merged_target.expand(count, r, channels), src, reduce="mean")
        return torch.cat([unmerged, dst], dim=1)

    def unmerge(x: Tensor) -> Tensor:
        length = kept.shape[1]
        unmerged, dst = x[..., :length, :], x[..., length:, :]
        channels = unmerged.shape[-1]
        src = torch.gather(dst, -2, merged_target.expand(batch, r, channels))
        out = torch.zeros(batch, tokens, channels, device=x.device, dtype=x.dtype)
        out.scatter_(-2, dst_index.expand(batch, destinations, channels), dst)
        source_positions = src_index.expand(batch, src_index.shape[1], 1)
        out.scatter_(-2, torch.gather(source_positions, 1, kept).expand(batch, length, channels),
                     unmerged)
        out.scatter_(-2, torch.gather(source_positions, 1, merged).expand(batch, r, channels),
                     src)
        return out

    return merge, unmerge


def _same(x: Tensor) -> Tensor:
    return x


@dataclass(eq=False)
class TokenMerging:
    """ToMe on the full-resolution self-attentions: `ratio` of the query tokens merged before
    attention and copied back after it. The destination picks come from a generator seeded
    from a call counter (ComfyUI draws them from torch's global generator)."""

    ratio: float
    stride: int = 2
    counter: int = 0
    unmerge: Callable[[Tensor], Tensor] = field(default=_same, repr=False)

    def merge(self, n: Tensor, context: Tensor, value: Tensor, options: Options) -> Any:
        _, _, height, width = options["original_shape"]
        downsample = int(math.ceil(math.sqrt((height * width) // n.shape[1])))
        if downsample > 1:
            self.unmerge = _same
            return n, context, value
        generator = torch.Generator().manual_seed(self.counter)
        self.counter += 1
        merge, self.unmerge = bipartite_matching(
            n, int(math.ceil(width / downsample)), int(math.ceil(height / downsample)),
            self.stride, int(n.shape[1] * self.ratio), generator)
        return merge(n), context, value

    def restore(self, out: Tensor, options: Options) -> Tensor:
        return self.unmerge(out)
