"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"): a trainable copy of the UNet's encoder half that reads a hint image and returns one
residual per UNet skip connection plus one for the middle block.

Module attribute names are the checkpoint keys after `control_model.` (shared/formats
controlnet_sd15.tsv): `time_embed`, `label_emb` (SDXL), `input_blocks`, `middle_block` (built
by the UNet's own builders), `input_hint_block.{0,2,...,14}`, `zero_convs.N.0`,
`middle_block_out.0`; ControlNet-Union models add `task_embedding`, `transformer_layes`,
`spatial_ch_projs` and `control_add_embedding` (networks/controlnet_union.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.diffusion.memory.cast_on_use import compute_dtype_of
from engine.diffusion.memory.offload import compute_device
from engine.diffusion.networks.controlnet_union import (
    ControlTypeEmbedding,
    FusionBlock,
    fuse_hint,
)
from engine.diffusion.networks.unet import (
    UNetConfig,
    _build_input_blocks,
    _build_middle_block,
    timestep_embedding,
)
from engine.diffusion.networks.unet_blocks import EmbedMLP

# Widths of the hint encoder's four stages in every released ControlNet (3 -> 16 -> 32 -> 96
# -> 256, then model_channels); the tiny test models use narrower ones.
RELEASED_HINT_WIDTHS = (16, 32, 96, 256)
TINY_HINT_WIDTHS = (8, 16, 16, 32)
HINT_DOWNSCALE = 8  # three stride-2 convs: the hint is given at the latent's pixel size
CONFIG_METADATA_KEY = "loom.controlnet_config"  # safetensors metadata of Loom's test files
SD1_CONTEXT_DIM = 768  # SD1 ControlNets use 8 heads; every later family uses 64-wide heads


class ControlNetLayoutError(ValueError):
    """ControlNet weights whose architecture cannot be read; the message says what was found."""


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet's architecture: the matching UNet's encoder half (`unet`; its decoder
    fields are unused) plus the hint encoder's input channels and stage widths;
    `union_types` > 0 makes a ControlNet-Union with that many control types."""

    unet: UNetConfig
    hint_channels: int = 3
    hint_widths: tuple[int, ...] = RELEASED_HINT_WIDTHS
    union_types: int = 0

    def __post_init__(self) -> None:
        if len(self.hint_widths) != 4:
            raise ValueError(
                f"hint_widths {self.hint_widths} has {len(self.hint_widths)} stages; the hint "
                "encoder needs 4 (three stride-2 steps between them give the 8x downscale)")

    @classmethod
    def for_unet(cls, unet: UNetConfig, *, tiny: bool = False) -> ControlNetConfig:
        """The ControlNet trained for a UNet of this architecture."""
        return cls(unet, 3, TINY_HINT_WIDTHS if tiny else RELEASED_HINT_WIDTHS)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ControlNetConfig:
        fields = json.loads(text)
        unet = UNetConfig(**{key: tuple(value) if isinstance(value, list) else value
                             for key, value in fields.pop("unet").items()})
        return cls(unet, int(fields["hint_channels"]), tuple(fields["hint_widths"]),
                   int(fields.get("union_types", 0)))


class HintEncoder(nn.ModuleDict):
    """`input_hint_block`: eight 3x3 convs with SiLU between (the odd checkpoint slots are the
    weightless SiLUs): a (B, 3, 8H, 8W) hint in 0..1 -> a (B, model_channels, H, W) map."""

    def __init__(self, hint_channels: int, widths: tuple[int, ...], out_channels: int) -> None:
        convs = [nn.Conv2d(hint_channels, widths[0], kernel_size=3, padding=1)]
        for width, next_width in zip(widths[:-1], widths[1:], strict=True):
            convs.append(nn.Conv2d(width, width, kernel_size=3, padding=1))
            convs.append(nn.Conv2d(width, next_width, kernel_size=3, stride=2, padding=1))
        convs.append(nn.Conv2d(widths[-1], out_channels, kernel_size=3, padding=1))
        super().__init__({str(2 * index): conv for index, conv in enumerate(convs)})

    def forward(self, hint: Tensor) -> Tensor:
        convs = list(self.values())
        h = hint
        for conv in convs[:-1]:
            h = F.silu(conv(h))
        return convs[-1](h)


def _one_by_one(channels: int) -> nn.Sequential:
    """A zero conv: 1x1, channels -> channels (checkpoint key `.0`)."""
    return nn.Sequential(nn.Conv2d(channels, channels, kernel_size=1))


class ControlNet(nn.Module):
    """Residuals for the UNet's skip connections and middle block, from a hint image.

    Runs in its parameters' dtype (or the one weights held narrower are cast up to, as in
    memory/cast_on_use.py); inputs are cast to it and the residuals are returned in the
    dtype of `x`, as the UNet does.
    """

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        unet = config.unet
        self.config = config
        self.time_embed = EmbedMLP(unet.model_channels, unet.time_embed_dim)
        self.label_emb: nn.ModuleDict | None = None
        if unet.adm_in_channels is not None:
            self.label_emb = nn.ModuleDict(
                {"0": EmbedMLP(unet.adm_in_channels, unet.time_embed_dim)})
        self.input_blocks, skip_channels = _build_input_blocks(unet)
        self.middle_block = _build_middle_block(unet)
        self.input_hint_block = HintEncoder(config.hint_channels, config.hint_widths,
                                            unet.model_channels)
        self.zero_convs = nn.ModuleList(_one_by_one(channels) for channels in skip_channels)
        self.middle_block_out = _one_by_one(unet.model_channels * unet.channel_mult[-1])
        if config.union_types:
            width = unet.model_channels
            self.task_embedding = nn.Parameter(torch.empty(config.union_types, width))
            self.transformer_layes = nn.Sequential(FusionBlock(width))
            self.spatial_ch_projs = nn.Linear(width, width)
            self.control_add_embedding = ControlTypeEmbedding(config.union_types,
                                                              unet.time_embed_dim)

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype_of(self, self.middle_block_out[0].weight)

    @property
    def device(self) -> torch.device:
        return compute_device(self)

    def forward(self, x: Tensor, hint: Tensor, timesteps: Tensor, context: Tensor,
                y: Tensor | None = None, control_type: Sequence[int] = ()
                ) -> tuple[list[Tensor], Tensor]:
        """x (B, C, H, W) the UNet's input latent, hint (B or 1, 3, 8H, 8W) in 0..1, timesteps
        (B,), context (B, T, context_dim), y (B, adm) for SDXL, control_type the selected
        ControlNet-Union type numbers (others ignore it) -> (one residual per input block, in
        order; the middle-block residual)."""
        self._check_inputs(x, hint, context, y)
        dtype = self.dtype
        emb = self.time_embed(
            timestep_embedding(timesteps, self.config.unet.model_channels).to(dtype))
        if self.config.union_types:
            emb = emb + self.control_add_embedding(control_type, dtype, emb.device)
        if self.label_emb is not None:
            assert y is not None
            emb = emb + self.label_emb["0"](y.to(dtype))
        context = context.to(dtype)
        guided = self.input_hint_block(hint.to(dtype=dtype, memory_format=torch.channels_last))
        if self.config.union_types and control_type:  # ComfyUI fuses the first type only
            guided = fuse_hint(guided, self.task_embedding[control_type[0]],
                               self.transformer_layes[0], self.spatial_ch_projs)
        h = x.to(dtype=dtype, memory_format=torch.channels_last)
        residuals = []
        stages = zip(self.input_blocks, self.zero_convs, strict=True)
        for index, (stage, zero_conv) in enumerate(stages):
            h = stage(h, emb, context)
            if index == 0:  # the hint joins right after conv_in (batch 1 broadcasts)
                h = h + guided
            residuals.append(zero_conv(h).to(x.dtype))
        h = self.middle_block(h, emb, context)
        return residuals, self.middle_block_out(h).to(x.dtype)

    def _check_inputs(self, x: Tensor, hint: Tensor, context: Tensor, y: Tensor | None) -> None:
        unet = self.config.unet
        if x.ndim != 4 or x.shape[1] != unet.in_channels:
            raise ValueError(f"x has shape {tuple(x.shape)} but this ControlNet takes "
                             f"(B, {unet.in_channels}, H, W) latents")
        expected = (x.shape[2] * HINT_DOWNSCALE, x.shape[3] * HINT_DOWNSCALE)
        if hint.ndim != 4 or hint.shape[1] != self.config.hint_channels \
                or tuple(hint.shape[2:]) != expected or hint.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"hint has shape {tuple(hint.shape)} but latents of shape {tuple(x.shape)} need "
                f"(1 or {x.shape[0]}, {self.config.hint_channels}, {expected[0]}, {expected[1]})"
                ": resize the hint to the latent's pixel size (8x)")
        if context.ndim != 3 or context.shape[-1] != unet.context_dim:
            raise ValueError(
                f"context has shape {tuple(context.shape)} but this ControlNet attends to "
                f"(B, T, {unet.context_dim}); use a ControlNet made for the model's family")
        if (y is None) != (unet.adm_in_channels is None):
            raise ValueError(
                f"y is {'missing' if y is None else 'given'} but this ControlNet's "
                f"adm_in_channels is {unet.adm_in_channels}; SDXL ControlNets need the "
                "model's y, others take none")


# --- architecture from the weights ---------------------------------------------------------


def _indices(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> list[int]:
    """The sorted distinct integers N of keys `prefix` + `N.`..."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(match.group(1)) for key in shapes if (match := pattern.match(key))})


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ControlNetLayoutError(
            f"the ControlNet weights have no {key!r} ({len(shapes)} tensors given); they are "
            "not an original-layout ControlNet or are damaged")
    return tuple(shapes[key])


def _encoder_levels(shapes: Mapping[str, tuple[int, ...]]) -> list[list[int]]:
    """Indices of the ResBlock input blocks, grouped by resolution level."""
    levels: list[list[int]] = [[]]
    for index in _indices(shapes, "input_blocks.")[1:]:
        if f"input_blocks.{index}.0.op.weight" in shapes:
            levels.append([])
        else:
            levels[-1].append(index)
    return levels


def _head_rule(context_dim: int) -> dict[str, int]:
    """Heads cannot be read from weights: SD1 has 8 heads, SD2/SDXL 64-wide heads."""
    return {"num_heads": 8} if context_dim == SD1_CONTEXT_DIM else {"num_head_channels": 64}


def detect_config(shapes: Mapping[str, tuple[int, ...]]) -> ControlNetConfig:
    """The architecture of original-layout ControlNet weights (keys without `control_model.`)."""
    model_channels, in_channels = _shape(shapes, "input_blocks.0.0.weight")[:2]
    levels = _encoder_levels(shapes)
    if any(len(level) != len(levels[0]) for level in levels) or not levels[0]:
        raise ControlNetLayoutError(
            f"input_blocks group into levels of {[len(level) for level in levels]} ResBlocks; "
            "a ControlNet has the same number at every level")
    first = [level[0] for level in levels]
    channel_mult = tuple(_shape(shapes, f"input_blocks.{i}.0.in_layers.2.weight")[0]
                         // model_channels for i in first)
    depths = tuple(len(_indices(shapes, f"input_blocks.{i}.1.transformer_blocks.")) for i in first)
    to_k = sorted(key for key in shapes if key.endswith("attn2.to_k.weight"))
    proj_in = sorted(key for key in shapes if key.endswith(".proj_in.weight"))
    if not to_k:
        raise ControlNetLayoutError("the ControlNet weights have no cross-attention "
                                    "(attn2.to_k); SD1/SD2/SDXL ControlNets all have some")
    context_dim = shapes[to_k[0]][1]
    adm = shapes["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in shapes else None
    unet = UNetConfig(
        in_channels=in_channels, out_channels=in_channels, model_channels=model_channels,
        channel_mult=channel_mult, num_res_blocks=len(levels[0]), transformer_depth=depths,
        transformer_depth_middle=len(_indices(shapes, "middle_block.1.transformer_blocks.")),
        context_dim=context_dim, use_linear_in_transformer=len(shapes[proj_in[0]]) == 2,
        adm_in_channels=adm, **_head_rule(context_dim))
    hint = [_shape(shapes, f"input_hint_block.{index}.weight") for index in (0, 4, 8, 12)]
    union = shapes["task_embedding"][0] if "task_embedding" in shapes else 0
    return ControlNetConfig(unet, hint[0][1], tuple(shape[0] for shape in hint), union)
