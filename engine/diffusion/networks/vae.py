"""The KL-f8 autoencoder of latent diffusion (LDM `AutoencoderKL`), with attribute names that
mirror the checkpoint keys under `first_stage_model.`, and the key conversion that also
accepts diffusers-format VAE files."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch.nn.functional as F
from torch import Tensor, nn

from engine.diffusion.networks.vae_bands import (
    DEFAULT_BANDS,
    BandPlan,
    norm_silu_conv,
    norm_silu_conv_add_,
    pad_downsample_conv,
    upsample_conv,
)


@dataclass(frozen=True)
class VAEConfig:
    """Shape of a KL autoencoder; the defaults are the SD1/SD2/SDXL KL-f8 VAE."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    norm_groups: int = 32
    norm_eps: float = 1e-6

    @classmethod
    def tiny(cls) -> VAEConfig:
        """A two-level, 32-channel VAE (downscale 2) for fast tests."""
        return cls(ch=32, ch_mult=(1, 2), num_res_blocks=1)

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along each axis (8 for KL-f8)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> VAEConfig:
        """Read the config from the shapes of an LDM-named VAE state dict."""
        try:
            ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]
            out_channels = sd["decoder.conv_out.weight"].shape[0]
            z_channels = sd["decoder.conv_in.weight"].shape[1]
        except KeyError as missing:
            raise ValueError(
                f"VAE state dict lacks {missing}; pass it through vae_state_dict_from_any first"
            ) from None
        levels = _count_indices(sd, r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight")
        mult = tuple(
            sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels)
        )
        res_blocks = _count_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight")
        return cls(in_channels, out_channels, ch, mult, res_blocks, z_channels)


def _count_indices(sd: Mapping[str, Tensor], pattern: str) -> int:
    indices = {int(m.group(1)) for key in sd if (m := re.fullmatch(pattern, key))}
    if not indices:
        raise ValueError(f"VAE state dict has no key matching {pattern!r}")
    return max(indices) + 1


def _group_norm(channels: int, config: VAEConfig) -> nn.GroupNorm:
    return nn.GroupNorm(config.norm_groups, channels, eps=config.norm_eps)


class ResnetBlock(nn.Module):
    """Two GroupNorm-SiLU-conv3x3 stages plus a skip (1x1 `nin_shortcut` when widths differ);
    in row bands when `bands` says so (vae_bands.py), the second conv over its own input."""

    def __init__(self, in_ch: int, out_ch: int, config: VAEConfig) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_ch, config)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _group_norm(out_ch, config)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor, bands: BandPlan = DEFAULT_BANDS) -> Tensor:
        largest = x.nbytes // x.shape[1] * max(x.shape[1], self.conv1.out_channels)
        if bands.applies(x, largest, *self.children()):
            h = norm_silu_conv(self.norm1, self.conv1, x, bands)
            return norm_silu_conv_add_(self.norm2, self.conv2, h, self._skip_rows(x), bands)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h

    def _skip_rows(self, x: Tensor) -> Callable[[int, int], Tensor]:
        """The skip's rows first..end, computed band by band: x is kept, not its projection."""
        shortcut = self.nin_shortcut
        if shortcut is None:
            return lambda first, end: x[:, :, first:end]
        return lambda first, end: shortcut(x[:, :, first:end])


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convs."""

    def __init__(self, channels: int, config: VAEConfig) -> None:
        super().__init__()
        self.norm = _group_norm(channels, config)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q, k, v = (self._tokens(conv(h)) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C), scale C**-0.5
        out = out.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(out)

    @staticmethod
    def _tokens(t: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, 1, H*W, C), contiguous: PyTorch's CPU SDPA takes its flash
        kernel only for contiguous channels and otherwise holds the (H*W)^2 scores (2.3 GB in
        fp32 for SDXL's 128x128 latent, at 1024x1024)."""
        return t.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()


class Downsample(nn.Module):
    """Halve the size: zero-pad right and bottom by one, then a stride-2 3x3 conv (as LDM)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor, bands: BandPlan = DEFAULT_BANDS) -> Tensor:
        if bands.applies(x, x.nbytes, self.conv):
            return pad_downsample_conv(self.conv, x, bands)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the size: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, bands: BandPlan = DEFAULT_BANDS) -> Tensor:
        if bands.applies(x, 4 * x.nbytes, self.conv):
            return upsample_conv(self.conv, x, bands)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """`mid.block_1`, `mid.attn_1`, `mid.block_2` at the lowest resolution."""

    def __init__(self, channels: int, config: VAEConfig) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, config)
        self.attn_1 = AttnBlock(channels, config)
        self.block_2 = ResnetBlock(channels, channels, config)

    def forward(self, x: Tensor, bands: BandPlan = DEFAULT_BANDS) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x, bands)), bands)


class Level(nn.Module):
    """One resolution level: `block.M` res blocks and an optional `downsample`/`upsample`."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        blocks: int,
        config: VAEConfig,
        *,
        downsample: bool = False,
        upsample: bool = False,
    ) -> None:
        super().__init__()
        widths = [in_ch] + [out_ch] * (blocks - 1)
        self.block = nn.ModuleList(ResnetBlock(w, out_ch, config) for w in widths)
        self.downsample = Downsample(out_ch) if downsample else None
        self.upsample = Upsample(out_ch) if upsample else None

    def steps(self) -> list[nn.Module]:
        """The level's layers in order, each called as `step(x, bands)`; callers that run them
        one by one drop each input as soon as its step returns."""
        resample = [m for m in (self.downsample, self.upsample) if m is not None]
        return [*self.block, *resample]

    def forward(self, x: Tensor, bands: BandPlan = DEFAULT_BANDS) -> Tensor:
        for step in self.steps():
            x = step(x, bands)
        return x


class Encoder(nn.Module):
    """Image [B, 3, H, W] in -1..1 -> moments [B, 2*z, H/f, W/f] (mean, logvar)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for index, out_ch in enumerate(widths):
            in_ch = widths[index - 1] if index else config.ch
            last = index == len(widths) - 1
            level = Level(in_ch, out_ch, config.num_res_blocks, config, downsample=not last)
            self.down.append(level)
        self.mid = MidBlock(widths[-1], config)
        self.norm_out = _group_norm(widths[-1], config)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.z_channels, 3, padding=1)

    def forward(self, x: Tensor, bands: BandPlan = DEFAULT_BANDS) -> Tensor:
        h = self.conv_in(x)
        for step in (step for level in self.down for step in level.steps()):
            h = step(h, bands)
        return _output_head(self.norm_out, self.conv_out, self.mid(h, bands), bands)


class Decoder(nn.Module):
    """Latent [B, z, h, w] -> image [B, 3, h*f, w*f], roughly in -1..1 (not clamped)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], config)
        # `up.N` is level N counted from the full resolution, run from the deepest level up
        self.up = nn.ModuleList()
        for index, out_ch in enumerate(widths):
            in_ch = widths[min(index + 1, len(widths) - 1)]
            blocks = config.num_res_blocks + 1
            self.up.append(Level(in_ch, out_ch, blocks, config, upsample=index != 0))
        self.norm_out = _group_norm(widths[0], config)
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, 3, padding=1)

    def forward(self, z: Tensor, bands: BandPlan = DEFAULT_BANDS) -> Tensor:
        h = self.mid(self.conv_in(z), bands)
        # step by step, not level by level: a level's input is dropped after its first block
        for step in (step for level in reversed(self.up) for step in level.steps()):
            h = step(h, bands)
        return _output_head(self.norm_out, self.conv_out, h, bands)


def _output_head(norm: nn.GroupNorm, conv: nn.Conv2d, h: Tensor, bands: BandPlan) -> Tensor:
    if bands.applies(h, h.nbytes, norm, conv):
        return norm_silu_conv(norm, conv, h, bands)
    return conv(F.silu(norm(h)))


class AutoencoderKL(nn.Module):
    """LDM's KL autoencoder: `encoder`, `decoder`, `quant_conv`, `post_quant_conv`."""

    compute_role = "vae"  # the model manager runs it on the policy's VAE device (--cpu-vae)

    def __init__(self, config: VAEConfig, bands: BandPlan = DEFAULT_BANDS) -> None:
        super().__init__()
        self.config = config
        self.bands = bands  # which layers run in row bands (vae_bands.py): memory, not numbers
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)

    def encode_moments(self, pixels: Tensor) -> Tensor:
        """Pixels [B, 3, H, W] in -1..1 -> posterior moments [B, 2*z, H/f, W/f]."""
        return self.quant_conv(self.encoder(pixels, self.bands))

    def encode_mean(self, pixels: Tensor) -> Tensor:
        """The posterior's mean (= its mode), the unscaled latent [B, z, H/f, W/f]."""
        return self.encode_moments(pixels)[:, : self.config.z_channels]

    def decode(self, latent: Tensor) -> Tensor:
        """Unscaled latent [B, z, h, w] -> pixels [B, 3, h*f, w*f], roughly in -1..1."""
        return self.decoder(self.post_quant_conv(latent), self.bands)


# ---- key conversion: any VAE file -> our (LDM) names ---------------------------------------

_COMPONENT_PREFIXES = ("first_stage_model.", "vae.")
# training-time leftovers of unpruned VAE files (LPIPS/discriminator loss, EMA bookkeeping)
_TRAINING_ONLY = re.compile(r"(loss|model_ema)\.")
_RESNET_PARTS = "norm1|conv1|norm2|conv2|nin_shortcut"
_LDM_NAME = re.compile(
    r"((encoder|decoder)\.(conv_in|conv_out|norm_out)"
    r"|quant_conv|post_quant_conv"
    rf"|encoder\.down\.\d+\.(block\.\d+\.({_RESNET_PARTS})|downsample\.conv)"
    rf"|decoder\.up\.\d+\.(block\.\d+\.({_RESNET_PARTS})|upsample\.conv)"
    rf"|(encoder|decoder)\.mid\.(block_[12]\.({_RESNET_PARTS})|attn_1\.(norm|q|k|v|proj_out)))"
    r"\.(weight|bias)"
)
_ATTN_WEIGHT = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")
# diffusers attention names, current (to_q ...) and pre-0.14 (query ...), -> LDM names
_DIFFUSERS_ATTN = MappingProxyType({
    "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
    "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out",
})  # fmt: skip


def vae_state_dict_from_any(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Return the VAE tensors of `sd` under our LDM names.

    Accepts a whole checkpoint (keeps `first_stage_model.*`), a `vae.*`-prefixed dict, a
    standalone LDM VAE or a diffusers-format VAE; Linear attention weights become 1x1 convs.
    Tensors are not copied (reshapes are views), so memory-mapped inputs stay mapped.
    """
    component = _strip_component_prefix(sd)
    component = {k: v for k, v in component.items() if not _TRAINING_ONLY.match(k)}
    if any(re.search(r"(down_blocks|up_blocks|mid_block)\.", k) for k in component):
        component = _diffusers_to_ldm(component)
    unknown = sorted(k for k in component if not _LDM_NAME.fullmatch(k))
    if unknown or not component:
        raise ValueError(
            f"not a KL VAE state dict: {len(unknown)} of {len(component)} tensor names are "
            f"unrecognised, e.g. {unknown[:5]}; expected LDM names such as "
            "'encoder.down.0.block.0.conv1.weight' (optionally under 'first_stage_model.') or "
            "diffusers names such as 'encoder.down_blocks.0.resnets.0.conv1.weight'. "
            "Check that the file is an SD1/SD2/SDXL VAE or checkpoint."
        )
    return {k: _as_conv_weight(k, v) for k, v in component.items()}


def _strip_component_prefix(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _COMPONENT_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return dict(sd)


def _as_conv_weight(key: str, tensor: Tensor) -> Tensor:
    if _ATTN_WEIGHT.fullmatch(key) and tensor.ndim == 2:
        return tensor.reshape(*tensor.shape, 1, 1)  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
    return tensor


def _diffusers_to_ldm(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    up_levels = [int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))]
    deepest = max(up_levels, default=0)
    return {_diffusers_name_to_ldm(key, deepest): tensor for key, tensor in sd.items()}


def _diffusers_name_to_ldm(key: str, deepest_up: int) -> str:
    """One diffusers VAE name -> LDM name; names it does not know pass through unchanged."""
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    key = re.sub(r"\.conv_shortcut\.", ".nin_shortcut.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(
        r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key
    )
    # diffusers counts decoder levels from the deepest one; LDM from the full resolution
    match = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.", key)
    if match:
        part = "block." if match.group(2) == "resnets" else "upsample."
        level = deepest_up - int(match.group(1))
        key = f"decoder.up.{level}.{part}" + key[match.end() :]
    key = re.sub(
        r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
        lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.",
        key,
    )
    match = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key)
    if match and match.group(2) in _DIFFUSERS_ATTN:
        key = f"{match.group(1)}.mid.attn_1.{_DIFFUSERS_ATTN[match.group(2)]}.{match.group(3)}"
    return key
