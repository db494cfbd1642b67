"""Convolutional building blocks of the LDM UNet (ResBlock, Downsample, Upsample) and the
per-index stage container; attribute names mirror the checkpoint keys.

LDM stores several layers in `nn.Sequential`s whose odd slots are weightless (SiLU, Dropout).
We keep only the weighted slots, in `nn.ModuleDict`s keyed by the checkpoint index, and apply
the activations in `forward`, so `in_layers.2.weight` loads without placeholder layers.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from engine.diffusion.memory.packed_conv import Conv2d
from engine.diffusion.networks.attention import NORM_GROUPS, SpatialTransformer
from engine.diffusion.networks.unet_patches import UNetCall


def group_norm(channels: int) -> nn.GroupNorm:
    """LDM's `normalization()`: 32 groups, torch's default eps 1e-5."""
    return nn.GroupNorm(NORM_GROUPS, channels)


class EmbedMLP(nn.ModuleDict):
    """Linear -> SiLU -> Linear (`time_embed`, `label_emb.0`); keys `0` and `2`."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__({"0": nn.Linear(in_features, out_features),
                          "2": nn.Linear(out_features, out_features)})

    def forward(self, x: Tensor) -> Tensor:
        return self["2"](F.silu(self["0"](x)))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between (DDPM/LDM)."""

    def __init__(self, channels: int, out_channels: int, emb_channels: int) -> None:
        super().__init__()
        # slots: in_layers = [norm, SiLU, conv]; emb_layers = [SiLU, linear];
        # out_layers = [norm, SiLU, Dropout, conv]
        self.in_layers = nn.ModuleDict({
            "0": group_norm(channels),
            "2": Conv2d(channels, out_channels, kernel_size=3, padding=1)})
        self.emb_layers = nn.ModuleDict({"1": nn.Linear(emb_channels, out_channels)})
        self.out_layers = nn.ModuleDict({
            "0": group_norm(out_channels),
            "3": Conv2d(out_channels, out_channels, kernel_size=3, padding=1)})
        self.skip_connection: nn.Module = (
            nn.Identity() if channels == out_channels
            else Conv2d(channels, out_channels, kernel_size=1))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # in-place ops only on fresh outputs whose backward does not need them: fewer large
        # allocations (each a round of page faults on CPU) and less memory traffic
        h = self.in_layers["2"](F.silu(self.in_layers["0"](x), inplace=True))
        emb_out = self.emb_layers["1"](F.silu(emb))  # (B, C_out)
        h.add_(emb_out[:, :, None, None])
        h = self.out_layers["3"](F.silu(self.out_layers["0"](h), inplace=True))
        return h.add_(self.skip_connection(x))


class Downsample(nn.Module):
    """Stride-2 3x3 conv; key `op`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize then a 3x3 conv; key `conv`.

    The target size is the matching skip connection's, which is 2x the input except for odd
    latent sizes (a 65-wide map downsamples to 33 and must come back to 65, not 66).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNetStage(nn.ModuleList):
    """One `input_blocks.N` / `middle_block` / `output_blocks.N` entry: layers run in order,
    each given the inputs it needs (LDM's TimestepEmbedSequential)."""

    def forward(self, h: Tensor, emb: Tensor, context: Tensor,
                out_size: tuple[int, int] | None = None, call: UNetCall | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context, call)
                if call is not None:  # counted over the whole UNet, as ComfyUI counts it
                    call.options["transformer_index"] += 1
            elif isinstance(layer, Upsample):
                h = layer(h, out_size if out_size is not None else (h.shape[2] * 2, h.shape[3] * 2))
            else:
                h = layer(h)
        return h
