"""UNet patches of ComfyUI's model-patch nodes, built on the patch points (FreeU) or on weight
deltas (attention multipliers); the equations are their papers'."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from engine.diffusion.patches.weight_patches import ParamDelta, WeightDeltaPatch

FREEU_SKIP_CUTOFF = 1  # FreeU filters the 2x2 lowest frequencies of the skip features


def fourier_scale(x: Tensor, scale_low: float, scale_high: float, cutoff: int) -> Tensor:
    """Scale a map's centred spectrum: `scale_low` inside the (2 cutoff)^2 low-frequency square,
    `scale_high` outside (FreSca, Huang et al. 2025; FreeU's skip filter is scale_high = 1).
    The square's bounds are plain slices, so a cutoff past the centre clips as ComfyUI's does."""
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    height, width = spectrum.shape[-2:]
    mask = torch.full(spectrum.shape, scale_high, device=x.device)
    row, col = height // 2, width // 2
    mask[..., row - cutoff:row + cutoff, col - cutoff:col + cutoff] = scale_low
    spectrum = torch.fft.ifftshift(spectrum * mask, dim=(-2, -1))
    return torch.fft.ifftn(spectrum, dim=(-2, -1)).real.to(x.dtype)


@dataclass(frozen=True)
class FreeU:
    """output_block_patch of FreeU (Si et al. 2024): at the decoder stages whose features have
    4x / 2x the base channels, the first half of the backbone channels is scaled by b and the
    skip features' lowest frequencies by s. `v2` scales by (b - 1) * m + 1 instead, m the
    per-sample min-max normalised channel mean of the backbone features."""

    scales: MappingProxyType[int, tuple[float, float]]  # channels -> (b, s)
    v2: bool = False

    @classmethod
    def for_model(cls, model_channels: int, b1: float, b2: float, s1: float, s2: float,
                  v2: bool = False) -> FreeU:
        return cls(MappingProxyType({model_channels * 4: (b1, s1), model_channels * 2: (b2, s2)}),
                   v2)

    def __call__(self, h: Tensor, skip: Tensor, options: Any) -> tuple[Tensor, Tensor]:
        scale = self.scales.get(int(h.shape[1]))
        if scale is None:
            return h, skip
        backbone, skip_scale = scale
        half = h.shape[1] // 2
        factor: Tensor | float = backbone
        if self.v2:
            factor = (backbone - 1) * _normalised_mean(h) + 1
        h = torch.cat([h[:, :half] * factor, h[:, half:]], dim=1)
        return h, fourier_scale(skip, skip_scale, 1.0, FREEU_SKIP_CUTOFF)


def _normalised_mean(h: Tensor) -> Tensor:
    """The channel mean of each sample mapped to 0..1 over its pixels: (B, 1, H, W)."""
    mean = h.mean(1).unsqueeze(1)
    flat = mean.view(mean.shape[0], -1)
    low = flat.min(dim=-1, keepdim=True).values[:, :, None, None]
    high = flat.max(dim=-1, keepdim=True).values[:, :, None, None]
    return (mean - low) / (high - low)


def scaled_parameters(module: nn.Module, factors: dict[str, float]) -> WeightDeltaPatch:
    """A weight patch multiplying each parameter whose name ends in a key of `factors` (its
    weight and bias) by that factor: ComfyUI's attention multipliers."""
    deltas = []
    for name, _ in module.named_parameters():
        for suffix, factor in factors.items():
            if factor != 1.0 and name.endswith((f"{suffix}.weight", f"{suffix}.bias")):
                deltas.append(ParamDelta(name, _times(factor - 1.0), 1.0))
    return WeightDeltaPatch(tuple(deltas))


def scaled_rows(module: nn.Module, suffix: str, row_factors: Iterable[float]) -> WeightDeltaPatch:
    """Each parameter ending in `suffix` (+ .weight/.bias with a packed q/k/v first axis) with
    its equal row blocks multiplied by the factors in order (OpenCLIP's in_proj)."""
    factors = list(row_factors)
    deltas = []
    for name, param in module.named_parameters():
        if not name.endswith((f"{suffix}_weight", f"{suffix}_bias")):
            continue
        rows = param.shape[0] // len(factors)
        deltas.extend(
            ParamDelta(name, _times(factor - 1.0), 1.0, (index * rows, (index + 1) * rows))
            for index, factor in enumerate(factors) if factor != 1.0)
    return WeightDeltaPatch(tuple(deltas))


def _times(amount: float) -> Any:
    """A DeltaFn: amount * the current weight (so weight + delta = (1 + amount) * weight)."""
    def delta(weight: Tensor) -> Tensor:
        return weight * amount
    return delta
