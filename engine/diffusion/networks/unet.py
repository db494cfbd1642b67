"""The LDM ("openaimodel") UNet of SD1.x, SD2.x, SDXL base and refiner, the SD x4 upscaler and
Lotus-D, one implementation configured by a frozen `UNetConfig`; module names mirror the
`model.diffusion_model.` keys.

The network predicts whatever it was trained on (eps or v); the parameterisation is decided
by checkpoint detection and applied by a wrapper, never here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

import torch
from torch import Tensor, nn

from engine.diffusion.memory.cast_on_use import compute_dtype_of
from engine.diffusion.memory.packed_conv import Conv2d
from engine.diffusion.networks.attention import SpatialTransformer
from engine.diffusion.networks.unet_blocks import (
    Downsample,
    EmbedMLP,
    ResBlock,
    UNetStage,
    Upsample,
    group_norm,
)
from engine.diffusion.networks.unet_patches import UNetCall

CHECKPOINT_PREFIX = "model.diffusion_model."
# SDXL embeds each size/crop/score number with a 256-wide sinusoidal embedding.
ADM_NUMBER_DIM = 256


class UNetFamily(str, Enum):
    """Model families with distinct UNet layouts (the prediction type is not part of this)."""

    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl_refiner"
    SD_X4 = "sd_x4"  # Stable Diffusion x4 upscaler (stabilityai x4-upscaler-ema)
    LOTUS = "lotus"  # Lotus-D depth/normal estimation (an SD2 UNet with a task embedding)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of one UNet. Exactly one of `num_heads` (SD1: fixed head count) and
    `num_head_channels` (SD2/SDXL: fixed head width) is set."""

    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    transformer_depth: tuple[int, ...]  # per level; 0 = no attention at that level
    transformer_depth_middle: int  # blocks in the middle SpatialTransformer (>= 1)
    context_dim: int
    use_linear_in_transformer: bool
    num_heads: int | None = None
    num_head_channels: int | None = None
    adm_in_channels: int | None = None  # width of `y` (SDXL: pooled text + size numbers)
    # `y` as class labels of an embedding table (`label_emb.weight`); the x4 upscaler's noise
    # level (LDM's integer num_classes). Exclusive with adm_in_channels.
    num_classes: int | None = None
    # per level: False turns that level's first attention into a second cross-attention on
    # the text (LDM's disable_self_attentions; the x4 upscaler's three top levels)
    self_attention: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(
                f"transformer_depth {self.transformer_depth} has {len(self.transformer_depth)} "
                f"entries but channel_mult {self.channel_mult} has {len(self.channel_mult)}; "
                "give one depth per resolution level")
        if self.transformer_depth_middle < 1:
            raise ValueError(
                f"transformer_depth_middle is {self.transformer_depth_middle}; the middle block "
                "is ResBlock, SpatialTransformer, ResBlock and needs a depth >= 1")
        if (self.num_heads is None) == (self.num_head_channels is None):
            raise ValueError(
                f"set exactly one of num_heads ({self.num_heads}) and num_head_channels "
                f"({self.num_head_channels}): SD1 uses num_heads=8, SD2/SDXL num_head_channels=64")
        if self.num_classes is not None and self.adm_in_channels is not None:
            raise ValueError(
                f"num_classes ({self.num_classes}) and adm_in_channels ({self.adm_in_channels}) "
                "are both set; a UNet's y is either class labels or a vector, not both")
        if self.self_attention is not None and len(self.self_attention) != len(
                self.channel_mult):
            raise ValueError(
                f"self_attention {self.self_attention} needs one flag per level of "
                f"channel_mult {self.channel_mult}")

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def level_self_attention(self, level: int | None) -> bool:
        """Whether the transformers of `level` (None: the middle block) attend to the pixels."""
        return level is None or self.self_attention is None or self.self_attention[level]

    def attention_heads(self, channels: int) -> tuple[int, int]:
        """(heads, dim_head) of a transformer over `channels` channels."""
        if self.num_heads is not None:
            return self.num_heads, channels // self.num_heads
        assert self.num_head_channels is not None
        return channels // self.num_head_channels, self.num_head_channels

    @classmethod
    def preset(cls, family: UNetFamily, in_channels: int | None = None) -> UNetConfig:
        """The released full-size layout; in_channels 9 gives the inpainting variant (default:
        the family's, 7 for the x4 upscaler, else 4)."""
        config = _PRESETS[family]()
        return config if in_channels is None else dataclasses.replace(config,
                                                                      in_channels=in_channels)

    @classmethod
    def tiny(cls, family: UNetFamily, in_channels: int | None = None) -> UNetConfig:
        """A ~1-3M-parameter model with the family's structure (proj kind, head rule, ADM), for
        tests. Its SDXL `y` is 32 pooled features plus the family's 256-wide numbers."""
        config = _TINY[family]()
        return config if in_channels is None else dataclasses.replace(config,
                                                                      in_channels=in_channels)


def _sd1() -> UNetConfig:
    return UNetConfig(in_channels=4, out_channels=4, model_channels=320,
                      channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                      transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1,
                      context_dim=768, use_linear_in_transformer=False, num_heads=8)


def _sd2() -> UNetConfig:
    return dataclasses.replace(_sd1(), context_dim=1024, use_linear_in_transformer=True,
                               num_heads=None, num_head_channels=64)


def _sdxl() -> UNetConfig:
    return UNetConfig(in_channels=4, out_channels=4, model_channels=320,
                      channel_mult=(1, 2, 4), num_res_blocks=2,
                      transformer_depth=(0, 2, 10), transformer_depth_middle=10,
                      context_dim=2048, use_linear_in_transformer=True, num_head_channels=64,
                      adm_in_channels=1280 + 6 * ADM_NUMBER_DIM)


def _sdxl_refiner() -> UNetConfig:
    return UNetConfig(in_channels=4, out_channels=4, model_channels=384,
                      channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                      transformer_depth=(0, 4, 4, 0), transformer_depth_middle=4,
                      context_dim=1280, use_linear_in_transformer=True, num_head_channels=64,
                      adm_in_channels=1280 + 5 * ADM_NUMBER_DIM)


def _sd_x4() -> UNetConfig:
    """stabilityai's x4-upscaling.yaml: 7 input channels (latent + noise-augmented low-res
    RGB), attention at levels 1-3 with 8 heads, the top three without self-attention, and the
    augmentation's noise level as a class label (1000 classes)."""
    return UNetConfig(in_channels=7, out_channels=4, model_channels=256,
                      channel_mult=(1, 2, 2, 4), num_res_blocks=2,
                      transformer_depth=(0, 1, 1, 1), transformer_depth_middle=1,
                      context_dim=1024, use_linear_in_transformer=True, num_heads=8,
                      num_classes=1000, self_attention=(False, False, False, True))


def _lotus() -> UNetConfig:
    """Lotus-D: SD2's UNet, 4-channel input, `y` the 4-wide task embedding."""
    return dataclasses.replace(_sd2(), adm_in_channels=4)


def _tiny_sd1() -> UNetConfig:
    return UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2),
                      num_res_blocks=2, transformer_depth=(1, 0), transformer_depth_middle=1,
                      context_dim=24, use_linear_in_transformer=False, num_heads=2)


def _tiny_sd2() -> UNetConfig:
    return UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2),
                      num_res_blocks=2, transformer_depth=(1, 1), transformer_depth_middle=1,
                      context_dim=40, use_linear_in_transformer=True, num_head_channels=16)


def _tiny_sdxl() -> UNetConfig:
    return UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 2),
                      num_res_blocks=2, transformer_depth=(0, 1, 2), transformer_depth_middle=2,
                      context_dim=48, use_linear_in_transformer=True, num_head_channels=16,
                      adm_in_channels=32 + 6 * ADM_NUMBER_DIM)


def _tiny_sd_x4() -> UNetConfig:
    return UNetConfig(in_channels=7, out_channels=4, model_channels=32, channel_mult=(1, 2, 2),
                      num_res_blocks=1, transformer_depth=(0, 1, 1), transformer_depth_middle=1,
                      context_dim=40, use_linear_in_transformer=True, num_heads=2,
                      num_classes=1000, self_attention=(False, False, True))


def _tiny_lotus() -> UNetConfig:
    return dataclasses.replace(_tiny_sd2(), adm_in_channels=4)


def _tiny_sdxl_refiner() -> UNetConfig:
    return UNetConfig(in_channels=4, out_channels=4, model_channels=32,
                      channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                      transformer_depth=(0, 1, 1, 0), transformer_depth_middle=1,
                      context_dim=40, use_linear_in_transformer=True, num_head_channels=16,
                      adm_in_channels=32 + 5 * ADM_NUMBER_DIM)


# read-only tables of config factories
_PRESETS = MappingProxyType({
    UNetFamily.SD1: _sd1, UNetFamily.SD2: _sd2, UNetFamily.SDXL: _sdxl,
    UNetFamily.SDXL_REFINER: _sdxl_refiner, UNetFamily.SD_X4: _sd_x4,
    UNetFamily.LOTUS: _lotus})
_TINY = MappingProxyType({
    UNetFamily.SD1: _tiny_sd1, UNetFamily.SD2: _tiny_sd2, UNetFamily.SDXL: _tiny_sdxl,
    UNetFamily.SDXL_REFINER: _tiny_sdxl_refiner, UNetFamily.SD_X4: _tiny_sd_x4,
    UNetFamily.LOTUS: _tiny_lotus})


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """LDM's sinusoidal embedding, [cos | sin] halves (diffusers: flip_sin_to_cos=True,
    freq_shift=0), always computed in fp32: (B,) -> (B, dim) float32."""
    half = dim // 2
    # operation order as in LDM, so the fp32 rounding (and the image) is the same
    indices = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * indices / half)
    args = timesteps.to(torch.float32)[:, None] * freqs[None, :]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.nn.functional.pad(embedding, (0, 1))
    return embedding


def _embed_numbers(pooled: Tensor, numbers: list[float]) -> Tensor:
    """cat(pooled, emb(n0), emb(n1), ...): (B, P) -> (B, P + 256 * len(numbers))."""
    values = torch.tensor(numbers, dtype=torch.float32, device=pooled.device)
    flat = timestep_embedding(values, ADM_NUMBER_DIM).flatten()  # (len * 256,)
    flat = flat[None, :].expand(pooled.shape[0], -1).to(pooled.dtype)
    return torch.cat([pooled, flat], dim=1)


def sdxl_adm(pooled: Tensor, *, width: float, height: float, crop_w: float, crop_h: float,
             target_width: float, target_height: float) -> Tensor:
    """SDXL base vector conditioning `y`: (B, 1280) pooled -> (B, 2816).

    Order (SDXL paper's size/crop conditioning, as ComfyUI and diffusers' add_time_ids lay it
    out): original size (height, width), crop top-left (crop_h = top, crop_w = left), target
    size (height, width); height always before width.
    """
    return _embed_numbers(pooled, [height, width, crop_h, crop_w, target_height, target_width])


def sdxl_refiner_adm(pooled: Tensor, *, width: float, height: float, crop_w: float,
                     crop_h: float, aesthetic_score: float) -> Tensor:
    """SDXL refiner vector conditioning `y`: (B, 1280) pooled -> (B, 2560).

    Order: original size (height, width), crop top-left (crop_h, crop_w), aesthetic score
    (ComfyUI's defaults are 6.0 for positive and 2.5 for negative prompts).
    """
    return _embed_numbers(pooled, [height, width, crop_h, crop_w, aesthetic_score])


class UNet(nn.Module):
    """Predicts the model output (eps or v) for a noisy latent, timesteps and text context.

    Runs in whatever dtype its parameters have (`.to(torch.bfloat16)`); the timestep embedding
    is computed in fp32 and cast, inputs are cast to the parameter dtype and the result is
    returned in the dtype of `x`. Activations are channels_last; for speed give the conv
    weights the same layout: `unet.to(dtype, memory_format=torch.channels_last)`.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.time_embed = EmbedMLP(config.model_channels, config.time_embed_dim)
        self.label_emb: nn.Module | None = None
        if config.adm_in_channels is not None:
            # LDM nests the MLP in a Sequential: keys `label_emb.0.{0,2}`
            self.label_emb = nn.ModuleDict(
                {"0": EmbedMLP(config.adm_in_channels, config.time_embed_dim)})
        elif config.num_classes is not None:  # key `label_emb.weight`
            self.label_emb = nn.Embedding(config.num_classes, config.time_embed_dim)
        self.input_blocks, skip_channels = _build_input_blocks(config)
        self.middle_block = _build_middle_block(config)
        self.output_blocks = _build_output_blocks(config, skip_channels)
        self.out = nn.ModuleDict({  # slot 1 is SiLU
            "0": group_norm(config.model_channels),
            "2": Conv2d(config.model_channels, config.out_channels, kernel_size=3, padding=1)})

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the UNet computes in (its weights' unless held smaller: cast_on_use)."""
        return compute_dtype_of(self, self.out["2"].weight)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                down_residuals: list[Tensor] | None = None,
                mid_residual: Tensor | None = None,
                input_residuals: list[Tensor | None] | None = None,
                call: UNetCall | None = None) -> Tensor:
        """x (B, in, H, W), timesteps (B,), context (B, T, context_dim), y (B, adm) for SDXL.

        `down_residuals` (one per input block, in order) are added to the skip connections and
        `mid_residual` to the middle block's output: how ControlNet steers the UNet.
        `input_residuals` (one per input block, None = nothing) are added to each input block's
        output before it feeds the next block and its skip connection: T2I-Adapters.
        `call` runs a MODEL's patch points (unet_patches.py) with this call's options.
        """
        if input_residuals is not None and len(input_residuals) != len(self.input_blocks):
            raise ValueError(
                f"got {len(input_residuals)} input_residuals but the UNet has "
                f"{len(self.input_blocks)} input blocks; use an adapter made for this family")
        self._check_inputs(x, timesteps, context, y, down_residuals)
        if call is not None and call.patches.empty:
            call = None
        if call is not None:
            call.options.update(original_shape=list(x.shape), transformer_index=0)
        dtype = self.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        if self.label_emb is not None:
            assert y is not None
            emb = emb + self._label_embedding(y, dtype)
        context = context.to(dtype)
        # NHWC activations: oneDNN's fast CPU convs (and cuDNN's tensor-core ones) want them,
        # and the transformers' (B, H*W, C) token views of them need no copy
        h = x.to(dtype=dtype, memory_format=torch.channels_last)
        skips = []
        for index, stage in enumerate(self.input_blocks):
            if call is not None:
                call.options["block"] = ("input", index)
            h = stage(h, emb, context, call=call)
            if input_residuals is not None and input_residuals[index] is not None:
                # in place: h is the block's fresh output, and its strides stay the same
                h.add_(input_residuals[index].to(dtype))
            if call is not None:
                h = call.run_block_patches("input_block_patch", h)
            skips.append(h)
            if call is not None:
                h = call.run_block_patches("input_block_patch_after_skip", h)
        if call is not None:
            call.options["block"] = ("middle", 0)
        h = self.middle_block(h, emb, context, call=call)
        if mid_residual is not None:
            h = h + mid_residual.to(dtype)
        if call is not None:
            h = call.run_block_patches("middle_block_patch", h)
        if down_residuals is not None:
            skips = [skip + extra.to(dtype)
                     for skip, extra in zip(skips, down_residuals, strict=True)]
        for index, stage in enumerate(self.output_blocks):
            skip = skips.pop()
            if call is not None:
                call.options["block"] = ("output", index)
                h, skip = call.run_output_block_patches(h, skip)
            h = torch.cat([h, skip], dim=1)
            out_size = tuple(skips[-1].shape[2:]) if skips else None
            h = stage(h, emb, context, out_size, call)
        h = self.out["2"](torch.nn.functional.silu(self.out["0"](h)))
        return h.to(dtype=x.dtype, memory_format=torch.contiguous_format)

    def _label_embedding(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        """The embedding of `y`: class labels looked up (x4 upscaler), vectors through the MLP."""
        if isinstance(self.label_emb, nn.Embedding):
            return self.label_emb(y.long()).to(dtype)
        assert isinstance(self.label_emb, nn.ModuleDict)
        return self.label_emb["0"](y.to(dtype))

    def _check_inputs(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None,
                      down_residuals: list[Tensor] | None) -> None:
        config = self.config
        if x.ndim != 4 or x.shape[1] != config.in_channels:
            raise ValueError(
                f"x has shape {tuple(x.shape)} but this UNet takes (B, {config.in_channels}, H, W)"
                "; an inpainting UNet takes cat(latent, mask, masked-image latent) = 9 channels")
        if timesteps.ndim != 1 or timesteps.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"timesteps has shape {tuple(timesteps.shape)}; give one per sample, "
                f"shape ({x.shape[0]},) (or (1,) to share it)")
        if context.ndim != 3 or context.shape[-1] != config.context_dim:
            raise ValueError(
                f"context has shape {tuple(context.shape)} but this UNet attends to "
                f"(B, T, {config.context_dim}); use the text encoder of the checkpoint's family")
        self._check_y(y)
        if down_residuals is not None and len(down_residuals) != len(self.input_blocks):
            raise ValueError(
                f"got {len(down_residuals)} down_residuals but the UNet has "
                f"{len(self.input_blocks)} input blocks; give one per block, in order")


    def _check_y(self, y: Tensor | None) -> None:
        config = self.config
        if config.num_classes is not None:
            if y is None or y.ndim != 1:
                raise ValueError(
                    f"y is {'missing' if y is None else f'of shape {tuple(y.shape)}'} but this "
                    f"UNet takes one class label per sample, shape (B,), below "
                    f"{config.num_classes} (the x4 upscaler's noise level)")
            return
        if (y is None) != (config.adm_in_channels is None):
            raise ValueError(
                f"y is {'missing' if y is None else 'given'} but adm_in_channels is "
                f"{config.adm_in_channels}; SDXL models need y from sdxl_adm/sdxl_refiner_adm, "
                "other models take none")
        if y is not None and (y.ndim != 2 or y.shape[1] != config.adm_in_channels):
            raise ValueError(
                f"y has shape {tuple(y.shape)}, expected (B, {config.adm_in_channels})")


def _build_input_blocks(config: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """`input_blocks`: conv_in, then per level num_res_blocks x (ResBlock [+ transformer]) and
    a Downsample except after the last level. Returns the blocks and each output's channels."""
    channels = config.model_channels
    blocks = [UNetStage([Conv2d(config.in_channels, channels, kernel_size=3, padding=1)])]
    skip_channels = [channels]
    for level, mult in enumerate(config.channel_mult):
        for _ in range(config.num_res_blocks):
            out_channels = config.model_channels * mult
            layers: list[nn.Module] = [ResBlock(channels, out_channels, config.time_embed_dim)]
            channels = out_channels
            if config.transformer_depth[level]:
                layers.append(_transformer(config, channels, config.transformer_depth[level],
                                           level))
            blocks.append(UNetStage(layers))
            skip_channels.append(channels)
        if level != len(config.channel_mult) - 1:
            blocks.append(UNetStage([Downsample(channels)]))
            skip_channels.append(channels)
    return nn.ModuleList(blocks), skip_channels


def _build_middle_block(config: UNetConfig) -> UNetStage:
    channels = config.model_channels * config.channel_mult[-1]
    return UNetStage([
        ResBlock(channels, channels, config.time_embed_dim),
        _transformer(config, channels, config.transformer_depth_middle, None),
        ResBlock(channels, channels, config.time_embed_dim)])


def _build_output_blocks(config: UNetConfig, skip_channels: list[int]) -> nn.ModuleList:
    """`output_blocks`: per level, deepest first, num_res_blocks + 1 x (ResBlock on
    cat(h, skip) [+ transformer]), the last of each level but the top one ending in Upsample."""
    skips = list(skip_channels)
    channels = config.model_channels * config.channel_mult[-1]
    blocks = []
    for level in reversed(range(len(config.channel_mult))):
        out_channels = config.model_channels * config.channel_mult[level]
        for index in range(config.num_res_blocks + 1):
            in_channels = channels + skips.pop()
            layers: list[nn.Module] = [
                ResBlock(in_channels, out_channels, config.time_embed_dim)]
            channels = out_channels
            if config.transformer_depth[level]:
                layers.append(_transformer(config, channels, config.transformer_depth[level],
                                           level))
            if level and index == config.num_res_blocks:
                layers.append(Upsample(channels))
            blocks.append(UNetStage(layers))
    return nn.ModuleList(blocks)


def _transformer(config: UNetConfig, channels: int, depth: int,
                 level: int | None) -> SpatialTransformer:
    """The transformer of one block at `level` (None: the middle block)."""
    heads, dim_head = config.attention_heads(channels)
    return SpatialTransformer(channels, config.context_dim, heads, dim_head, depth,
                              config.use_linear_in_transformer,
                              config.level_self_attention(level))
