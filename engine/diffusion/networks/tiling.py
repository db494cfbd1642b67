"""Apply an image -> image function (VAE encode or decode) tile by tile, so memory is bounded by
the tile size, and blend the overlapping tiles with feathered linear weights so no seam shows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fractions import Fraction

import torch
from torch import Tensor

TileFn = Callable[[Tensor], Tensor]
Progress = Callable[[int, int], None]


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of size `tile` covering `length`, neighbours overlapping by at
    least `overlap`, spread evenly; every start is a multiple of `align`."""
    if tile <= 0 or overlap < 0 or overlap >= tile:
        raise ValueError(
            f"tile {tile} / overlap {overlap}: need tile > 0 and 0 <= overlap < tile; "
            "lower the overlap or raise the tile size"
        )
    if length <= tile:
        return [0]
    max_stride = (tile - overlap) // align * align
    if max_stride <= 0:
        raise ValueError(f"tile {tile} minus overlap {overlap} is below the alignment {align}")
    gaps = -(-(length - tile) // max_stride)  # ceil: tiles - 1
    # even spacing, floored to `align`; floors never widen a gap past max_stride (a multiple
    # of `align`), so every overlap stays >= `overlap`. The last start is length - tile.
    starts = {(k * (length - tile) // gaps) // align * align for k in range(gaps + 1)}
    return sorted(starts)


def blend_weights(starts: Sequence[int], size: int, length: int) -> list[Tensor]:
    """Per-tile 1-D weights (length `size` each) that sum to exactly 1 at every position.

    Each tile ramps linearly up over its overlap with the previous tile and down over its
    overlap with the next one; the ramps of two neighbours are complementary, so the raw
    weights already sum to 1 where at most two tiles meet; dividing by the total keeps the
    sum 1 where three meet. A tile's weight is 1 where no other tile covers it.
    """
    raw = []
    for index, start in enumerate(starts):
        weight = torch.ones(size, dtype=torch.float64)
        if index > 0:
            ramp = _ramp(starts[index - 1] + size - start)
            weight[: len(ramp)] *= ramp
        if index < len(starts) - 1:
            ramp = _ramp(start + size - starts[index + 1])
            weight[size - len(ramp) :] *= ramp.flip(0)
        raw.append(weight)
    total = torch.zeros(length, dtype=torch.float64)
    for start, weight in zip(starts, raw, strict=True):
        total[start : start + size] += weight
    return [(w / total[s : s + size]).float() for s, w in zip(starts, raw, strict=True)]


def _ramp(width: int) -> Tensor:
    """(1, 2, ..., width) / (width + 1): strictly between 0 and 1, complementary to its flip."""
    return torch.arange(1, width + 1, dtype=torch.float64) / (width + 1)


def tiled_apply(
    fn: TileFn,
    x: Tensor,
    *,
    tile: int,
    overlap: int,
    scale: float | Fraction,
    out_channels: int,
    progress: Progress | None = None,
) -> Tensor:
    """Run `fn` on overlapping `tile` x `tile` windows of `x` [B, C, H, W] and blend the
    results into [B, out_channels, H*scale, W*scale].

    `tile` and `overlap` are in input pixels; `scale` is output size / input size (8 to
    decode a KL-f8 latent, 1/8 to encode). When one tile covers `x`, this is exactly fn(x).
    """
    ratio = Fraction(scale).limit_denominator(1024)
    align = ratio.denominator  # input offsets that map to whole output pixels
    _check_aligned(x, tile, overlap, align)
    height, width = x.shape[-2:]
    rows = tile_starts(height, tile, overlap, align)
    cols = tile_starts(width, tile, overlap, align)
    tile_h, tile_w = min(tile, height), min(tile, width)
    out_h, out_w = _scaled(tile_h, ratio), _scaled(tile_w, ratio)
    row_weights = blend_weights([_scaled(r, ratio) for r in rows], out_h, _scaled(height, ratio))
    col_weights = blend_weights([_scaled(c, ratio) for c in cols], out_w, _scaled(width, ratio))
    out: Tensor | None = None
    grid = [(i, j) for i in range(len(rows)) for j in range(len(cols))]
    for done, (i, j) in enumerate(grid, start=1):
        result = fn(x[..., rows[i] : rows[i] + tile_h, cols[j] : cols[j] + tile_w])
        _check_result(result, (x.shape[0], out_channels, out_h, out_w))
        if out is None:
            size = (x.shape[0], out_channels, _scaled(height, ratio), _scaled(width, ratio))
            out = result.new_zeros(size)
        weight = row_weights[i][:, None] * col_weights[j][None, :]  # (out_h, out_w)
        top, left = _scaled(rows[i], ratio), _scaled(cols[j], ratio)
        out[..., top : top + out_h, left : left + out_w] += result * weight.to(result)
        if progress is not None:
            progress(done, len(grid))
    assert out is not None  # the grid always has at least one tile
    return out


def _scaled(size: int, ratio: Fraction) -> int:
    return int(size * ratio)


def _check_aligned(x: Tensor, tile: int, overlap: int, align: int) -> None:
    if x.ndim != 4:
        raise ValueError(f"tiled_apply needs a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    named = {"height": x.shape[-2], "width": x.shape[-1], "tile": tile, "overlap": overlap}
    bad = {name: value for name, value in named.items() if value % align}
    if bad:
        raise ValueError(
            f"{bad} must be multiples of {align} (the input pixels per output pixel); "
            f"round them down to a multiple of {align}"
        )


def _check_result(result: Tensor, expected: tuple[int, ...]) -> None:
    if tuple(result.shape) != expected:
        raise ValueError(
            f"tile function returned shape {tuple(result.shape)}, expected {expected}; "
            "check the scale and out_channels passed to tiled_apply"
        )
