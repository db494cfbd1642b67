"""The VAE's full-resolution layers run in row bands: the same numbers as the plain layers
without their full-size temporaries.

At SDXL's 1024x1024 the decoder's top levels hold 0.5-1 GB tensors, and the plain layers
allocate several more of that size at once (GroupNorm's output, SiLU's, the upsampled tensor,
F.pad's copy, the residual sum). Here each block's input and output stay whole (GroupNorm needs
statistics over the whole tensor), but normalise + SiLU + conv run a band of rows at a time with
a one-row halo, the x2 upsample is fused into the conv after it, and the second conv of a
residual block writes its bands, skip added, over its own input.

The numbers are the plain path's: the statistics come from torch's own GroupNorm kernel run on
a few groups at a time (a group's statistics read only that group's contiguous block), the
normalisation is applied as torch applies it (a fused multiply-add per value: `addcmul`), and
a 3x3 conv of rows that carry their halo sums as the whole conv does wherever oneDNN picks the
same kernel for a band as for the whole tensor: full-size SD/SDXL decodes and encodes came out
bit-identical; tiny test shapes differ in the last bits. Banding is used only for contiguous
fp32 tensors on the CPU, in inference, on layers without hooks but their cast-up pair (a VAE
held in its file's fp16 is read cast to fp32 here, as the hooks would; a streamed layer keeps
the plain path).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.diffusion.memory.cast_on_use import casts_only

MIB = 2**20
# the rows one band allocates: its normalised input rows and its conv output rows, counted
# twice because oneDNN makes a blocked copy of each
_COPIES_PER_ROW = 2


@dataclass(frozen=True)
class BandPlan:
    """When a VAE layer runs in bands: when its input or output is over `threshold_bytes`
    (smaller layers gain nothing). A band's temporaries stay within about `band_bytes`.

    Every band costs a few parallel kernel calls; bands of 16 MB made the top levels ~1.6x
    slower on a busy 2-core host (each call waits for both threads), 64 MB ran as fast as the
    plain layers."""

    threshold_bytes: int = 64 * MIB
    band_bytes: int = 64 * MIB

    def applies(self, x: Tensor, largest_bytes: int, *layers: nn.Module) -> bool:
        """Whether `layers` run in bands on `x`, whose layer's biggest tensor is
        `largest_bytes`: only where the bands were checked to give the plain path's numbers."""
        return (
            largest_bytes > self.threshold_bytes
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and x.is_contiguous()
            and not torch.is_grad_enabled()  # the bands write in place
            and all(casts_only(layer) for layer in layers)
        )

    def spans(self, rows: int, row_bytes: int) -> Iterator[tuple[int, int]]:
        """(first, end) of each band over `rows` rows when one row's temporaries take
        `row_bytes`: as many rows as `band_bytes` allows, at least one."""
        step = max(1, self.band_bytes // max(1, row_bytes))
        for first in range(0, rows, step):
            yield first, min(rows, first + step)


DEFAULT_BANDS = BandPlan()


def _row_bytes(in_channels: int, out_channels: int, width: int, x: Tensor) -> int:
    return _COPIES_PER_ROW * (in_channels + out_channels) * width * x.element_size()


@dataclass(frozen=True)
class NormAffine:
    """An affine GroupNorm reduced to a per-(sample, channel) scale and shift, as torch's CPU
    kernel applies it: scale = rstd * weight, shift = fma(-scale, mean, bias), y = fma(x,
    scale, shift)."""

    scale: Tensor  # (B, C, 1, 1)
    shift: Tensor  # (B, C, 1, 1)

    @classmethod
    def of(cls, norm: nn.GroupNorm, x: Tensor, slab_bytes: int) -> NormAffine:
        """The affine map `norm` applies to `x` (B, C, H, W), reading `slab_bytes` at a time."""
        mean, rstd = _group_moments(norm, x, slab_bytes)  # (B, G)
        per_group = x.shape[1] // norm.num_groups
        weight, bias = _computed(norm, x)
        scale = rstd.repeat_interleave(per_group, 1) * weight  # (B, C)
        shift = torch.addcmul(bias, -scale, mean.repeat_interleave(per_group, 1))
        return cls(scale[..., None, None], shift[..., None, None])

    def silu_into(self, rows: Tensor, out: Tensor) -> None:
        """out = SiLU(GroupNorm(rows)) for rows of the tensor the statistics are of."""
        torch.addcmul(self.shift, rows, self.scale, out=out)
        F.silu(out, inplace=True)


def _group_moments(norm: nn.GroupNorm, x: Tensor, slab_bytes: int) -> tuple[Tensor, Tensor]:
    """Per (sample, group) mean and 1/std from torch's GroupNorm kernel, a slab of whole groups
    of one sample at a time: only the slab's normalised copy is made, not the whole tensor's."""
    batch, channels, height, width = x.shape
    groups = norm.num_groups
    per_group = channels // groups
    step = max(1, min(groups, slab_bytes // max(1, x[0, :per_group].nbytes)))
    means, rstds = [], []
    for sample in x:  # (C, H, W), contiguous
        for first in range(0, groups, step):
            count = min(step, groups - first)
            slab = sample[first * per_group : (first + count) * per_group].unsqueeze(0)
            _, mean, rstd = torch.native_group_norm(
                slab, None, None, 1, count * per_group, height * width, count, norm.eps
            )
            means.append(mean)
            rstds.append(rstd)
    return torch.cat(means, 1).view(batch, groups), torch.cat(rstds, 1).view(batch, groups)


def _computed(layer: nn.GroupNorm | nn.Conv2d, x: Tensor) -> tuple[Tensor, Tensor]:
    """The layer's weight and bias in x's dtype: what its cast-up hooks would hand it when the
    VAE is held in a narrower dtype (an exact widening), the parameters themselves otherwise."""
    return layer.weight.to(x.dtype), layer.bias.to(x.dtype)


def _conv_rows(conv: nn.Conv2d, weights: tuple[Tensor, Tensor], band: Tensor) -> Tensor:
    """`conv` (3x3, padding 1) over rows that carry their halo: columns padded, rows not."""
    return F.conv2d(band, *weights, padding=(0, 1))


def _conv_bands(
    norm: nn.GroupNorm, conv: nn.Conv2d, source: Tensor, plan: BandPlan
) -> Iterator[tuple[int, int, Tensor]]:
    """(first, end, rows first..end of conv(SiLU(norm(source)))) band by band. A band's input
    is read before the band is yielded and the normalised row above the next band is kept, so
    the caller may overwrite rows first..end of `source` with the band."""
    affine = NormAffine.of(norm, source, plan.band_bytes)
    batch, channels, height, width = source.shape
    row_bytes = _row_bytes(channels, conv.out_channels, width, source)
    weights = _computed(conv, source)
    above = source.new_zeros(batch, channels, 1, width)  # the conv's zero padding at the top
    for first, end in plan.spans(height, row_bytes):
        band = source.new_empty(batch, channels, end - first + 2, width)
        band[:, :, :1] = above
        below = min(end + 1, height)  # the halo row under the band, when there is one
        affine.silu_into(source[:, :, first:below], band[:, :, 1 : 1 + below - first])
        if below == end:
            band[:, :, -1:].zero_()  # the conv's zero padding at the bottom
        above = band[:, :, -2:-1].clone()
        yield first, end, _conv_rows(conv, weights, band)


def norm_silu_conv(norm: nn.GroupNorm, conv: nn.Conv2d, x: Tensor, plan: BandPlan) -> Tensor:
    """conv(SiLU(norm(x))) in bands, into a new tensor."""
    batch, _, height, width = x.shape
    out = x.new_empty(batch, conv.out_channels, height, width)
    for first, end, rows in _conv_bands(norm, conv, x, plan):
        out[:, :, first:end] = rows
    return out


def norm_silu_conv_add_(
    norm: nn.GroupNorm,
    conv: nn.Conv2d,
    h: Tensor,
    skip: Callable[[int, int], Tensor],
    plan: BandPlan,
) -> Tensor:
    """h <- skip + conv(SiLU(norm(h))), written band by band over `h` itself; `skip(first,
    end)` gives the skip's rows first..end. Returns `h`."""
    for first, end, rows in _conv_bands(norm, conv, h, plan):
        torch.add(skip(first, end), rows, out=h[:, :, first:end])
    return h


def upsample_conv(conv: nn.Conv2d, x: Tensor, plan: BandPlan) -> Tensor:
    """conv(nearest x2 upsample of x) in bands of source rows; the upsampled tensor is never
    whole."""
    batch, channels, height, width = x.shape
    out = x.new_empty(batch, conv.out_channels, 2 * height, 2 * width)
    row_bytes = 2 * _row_bytes(channels, conv.out_channels, 2 * width, x)  # 2 rows per source row
    weights = _computed(conv, x)
    for first, end in plan.spans(height, row_bytes):
        source = x[:, :, max(first - 1, 0) : end + 1]
        upsampled = F.interpolate(source, scale_factor=2.0, mode="nearest")
        # keep one upsampled halo row on each side, or zero-pad where the image ends
        top, bottom = (1 if first == 0 else -1), (1 if end == height else -1)
        band = F.pad(upsampled, (0, 0, top, bottom))
        out[:, :, 2 * first : 2 * end] = _conv_rows(conv, weights, band)
    return out


def pad_downsample_conv(conv: nn.Conv2d, x: Tensor, plan: BandPlan) -> Tensor:
    """conv (3x3, stride 2, no padding) of x zero-padded by one on the right and bottom, in bands
    of output rows; the padded copy of x is never whole."""
    batch, channels, height, width = x.shape
    # a 3-wide stride-2 window over the padded size (H + 1): (H + 1 - 3) // 2 + 1 rows
    out = x.new_empty(batch, conv.out_channels, (height - 2) // 2 + 1, (width - 2) // 2 + 1)
    row_bytes = _row_bytes(2 * channels, conv.out_channels, width, x)  # 2 input rows per row
    for first, end in plan.spans(out.shape[2], row_bytes):
        rows = x[:, :, 2 * first : 2 * end + 1]  # output row r reads input rows 2r..2r+2
        band = F.pad(rows, (0, 1, 0, 2 * end + 1 - (2 * first + rows.shape[2])))
        out[:, :, first:end] = conv(band)
    return out
