"""T2I-Adapters (Mou et al. 2023, "T2I-Adapter: Learning Adapters to Dig out More Controllable
Ability for Text-to-Image Diffusion Models"): a small network that turns a hint image into one
feature map per UNet resolution level, added to the UNet's own encoder features.

Two architectures, with attribute names as in TencentARC's released files (what ComfyUI loads):

* full (`conv_in`, `body.N.{in_conv, block1, block2, down_opt.op}`): pixel-unshuffle by
  8 (SD) or 16 (SDXL, told by conv_in's 256/768 input channels), then 4 levels of ResBlocks.
* light (`body.L.{in_conv, body.K.{block1, block2}, out_conv}`): 4 bottleneck extractors.

The diffusers layouts (`adapter.body.L.resnets.K...`) are renamed to these on load. Where the
features go follows ComfyUI: SD adapters add level L's map to input block 3L+2 (the last block
of each level); SDXL adapters add theirs to input blocks 3, 5 and 8 and the middle block.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.diffusion.memory.offload import compute_device

SD_UNSHUFFLE = 8
XL_UNSHUFFLE = 16
XL_CONV_IN_CHANNELS = (256, 768)  # 1 or 3 hint channels unshuffled by 16 (SD: 64 or 192)
SD_INPUT_SLOTS = (2, 5, 8, 11)  # input block that each level's feature is added to (of 12)
XL_INPUT_SLOTS = (3, 5, 8)  # the fourth SDXL feature goes to the middle block (of 9 blocks)
SD_INPUT_BLOCKS, XL_INPUT_BLOCKS = 12, 9


class AdapterLayoutError(ValueError):
    """Adapter weights whose architecture cannot be read; the message says what was found."""


@dataclass(frozen=True)
class AdapterConfig:
    """What the weights of one adapter file describe."""

    kind: str  # "full" | "light"
    in_channels: int  # after pixel-unshuffle: hint channels * unshuffle^2
    channels: tuple[int, ...]  # output width of each of the 4 levels
    blocks_per_level: int
    kernel_size: int = 1  # of block2 and in_conv in full adapters (1 in released files)
    conv_downsample: bool = False  # full adapters: stride-2 conv (down_opt.op) vs average pool

    @property
    def xl(self) -> bool:
        return self.kind == "full" and self.in_channels in XL_CONV_IN_CHANNELS

    @property
    def unshuffle(self) -> int:
        return XL_UNSHUFFLE if self.xl else SD_UNSHUFFLE

    @property
    def hint_channels(self) -> int:
        return self.in_channels // (self.unshuffle * self.unshuffle)

    def downsamples(self, level: int) -> bool:
        """Whether a level starts by halving the resolution (SDXL: only level 2)."""
        return level == 2 if self.xl else level > 0


@dataclass(frozen=True)
class AdapterFeatures:
    """Adapter outputs placed for the UNet: `input` has one entry per UNet input block (None
    where nothing is added); `middle` is added to the middle block's output (SDXL)."""

    input: tuple[Tensor | None, ...]
    middle: Tensor | None = None


def _halve(x: Tensor) -> Tensor:
    """2x2 average pool; odd sizes are padded by one (ComfyUI's rule), so the map keeps the
    size of the UNet's stride-2 conv output (ceil(n / 2))."""
    return F.avg_pool2d(x, kernel_size=2, stride=2, padding=(x.shape[2] % 2, x.shape[3] % 2))


class T2IAdapter(nn.Module):
    """Base of both architectures: hint preparation and feature placement; subclasses
    compute the per-level features (`levels`)."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config

    def levels(self, hint: Tensor) -> list[Tensor]:
        """(B, in_channels, H, W) unshuffled hint -> the 4 level features."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return compute_device(self)

    def hint_size(self, latent_height: int, latent_width: int) -> tuple[int, int]:
        """(height, width) the hint is resized to: the latent's pixel size rounded up to a
        multiple of the pixel-unshuffle factor."""
        step = self.config.unshuffle
        return (-(-latent_height * 8 // step) * step, -(-latent_width * 8 // step) * step)

    def forward(self, hint: Tensor) -> AdapterFeatures:
        """hint (B, 1 or 3, H, W) in 0..1, H and W multiples of the unshuffle factor."""
        if self.config.hint_channels == 1 and hint.shape[1] > 1:
            hint = hint.mean(dim=1, keepdim=True)
        if hint.shape[1] != self.config.hint_channels:
            raise ValueError(f"hint has {hint.shape[1]} channels; this adapter takes "
                             f"{self.config.hint_channels}")
        unshuffled = F.pixel_unshuffle(hint.to(self.dtype), self.config.unshuffle)
        levels = self.levels(unshuffled)
        if self.config.xl:
            return AdapterFeatures(_placed(levels[:3], XL_INPUT_SLOTS, XL_INPUT_BLOCKS),
                                   levels[3])
        return AdapterFeatures(_placed(levels, SD_INPUT_SLOTS, SD_INPUT_BLOCKS))


class AdapterResBlock(nn.Module):
    """Full-adapter block: [halve] -> [in_conv when the width changes] -> x + block2(relu(
    block1(x))). (The released files have no `skep` convs; ComfyUI loads none either.)"""

    def __init__(self, in_channels: int, out_channels: int, *, down: bool, kernel_size: int,
                 conv_downsample: bool) -> None:
        super().__init__()
        padding = kernel_size // 2
        self.down = down
        self.down_opt: nn.ModuleDict | None = None
        if down and conv_downsample:
            self.down_opt = nn.ModuleDict({"op": nn.Conv2d(in_channels, in_channels, 3, 2, 1)})
        self.in_conv: nn.Conv2d | None = None
        if in_channels != out_channels:
            self.in_conv = nn.Conv2d(in_channels, out_channels, kernel_size, 1, padding)
        self.block1 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.block2 = nn.Conv2d(out_channels, out_channels, kernel_size, 1, padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.down:
            x = self.down_opt["op"](x) if self.down_opt is not None else _halve(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.block2(F.relu(self.block1(x)))


class FullAdapter(T2IAdapter):
    """TencentARC's full adapter (SD1.x and SDXL)."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__(config)
        channels = config.channels
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, 1, 1)
        blocks = []
        for level, width in enumerate(channels):
            for index in range(config.blocks_per_level):
                first = index == 0 and level > 0
                blocks.append(AdapterResBlock(
                    channels[level - 1] if first else width, width,
                    down=first and config.downsamples(level), kernel_size=config.kernel_size,
                    conv_downsample=config.conv_downsample))
        self.body = nn.ModuleList(blocks)

    def levels(self, hint: Tensor) -> list[Tensor]:
        x = self.conv_in(hint)
        features = []
        for start in range(0, len(self.body), self.config.blocks_per_level):
            for block in self.body[start:start + self.config.blocks_per_level]:
                x = block(x)
            features.append(x)
        return features


class LightResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.block2 = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block2(F.relu(self.block1(x)))


class LightExtractor(nn.Module):
    """[halve] -> 1x1 in_conv to a quarter width -> ResBlocks -> 1x1 out_conv."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, down: bool) -> None:
        super().__init__()
        inner = out_channels // 4
        self.down = down
        self.in_conv = nn.Conv2d(in_channels, inner, 1)
        self.body = nn.ModuleList(LightResBlock(inner) for _ in range(blocks))
        self.out_conv = nn.Conv2d(inner, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.in_conv(_halve(x) if self.down else x)
        for block in self.body:
            x = block(x)
        return self.out_conv(x)


class LightAdapter(T2IAdapter):
    """TencentARC's light adapter (SD1.x)."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__(config)
        widths = (config.in_channels, *config.channels)
        self.body = nn.ModuleList(
            LightExtractor(widths[level], widths[level + 1], config.blocks_per_level, level > 0)
            for level in range(len(config.channels)))

    def levels(self, hint: Tensor) -> list[Tensor]:
        features = []
        x = hint
        for extractor in self.body:
            x = extractor(x)
            features.append(x)
        return features


def build_adapter(config: AdapterConfig) -> T2IAdapter:
    return FullAdapter(config) if config.kind == "full" else LightAdapter(config)


def _placed(levels: list[Tensor], slots: tuple[int, ...], count: int
            ) -> tuple[Tensor | None, ...]:
    placed: list[Tensor | None] = [None] * count
    for slot, feature in zip(slots, levels, strict=True):
        placed[slot] = feature
    return tuple(placed)


# --- layouts -------------------------------------------------------------------------------


def is_adapter(keys: Mapping[str, object]) -> bool:
    """Whether the weights look like a T2I-Adapter (original or diffusers layout)."""
    full = "conv_in.weight" in keys and "body.0.block1.weight" in keys
    return full or "body.0.in_conv.weight" in keys or "adapter.body.0.resnets.0.block1.weight" \
        in keys


def from_diffusers(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `adapter.` names -> the original ones (full: body L*R+K; light: body.L.body.K)."""
    full = "adapter.conv_in.weight" in tensors
    per_level = 1 + max(int(m.group(1)) for key in tensors
                        if (m := re.match(r"adapter\.body\.0\.resnets\.(\d+)\.", key)))
    renamed = {}
    for key, tensor in tensors.items():
        name = key.removeprefix("adapter.")
        if (match := re.match(r"body\.(\d+)\.resnets\.(\d+)\.(.*)", name)):
            level, index, rest = int(match.group(1)), int(match.group(2)), match.group(3)
            name = (f"body.{level * per_level + index}.{rest}" if full
                    else f"body.{level}.body.{index}.{rest}")
        elif full and (match := re.match(r"body\.(\d+)\.in_conv\.(.*)", name)):
            name = f"body.{int(match.group(1)) * per_level}.in_conv.{match.group(2)}"
        renamed[name] = tensor
    return renamed


def detect_config(shapes: Mapping[str, tuple[int, ...]]) -> AdapterConfig:
    """The adapter architecture of original-layout weights."""
    if "conv_in.weight" in shapes:
        blocks = _count(shapes, r"body\.(\d+)\.block1\.weight")
        if blocks % 4:
            raise AdapterLayoutError(f"a full T2I-Adapter has 4 levels of equal length; found "
                                     f"{blocks} body blocks")
        per_level = blocks // 4
        widths = tuple(shapes[f"body.{level * per_level}.block1.weight"][0] for level in range(4))
        return AdapterConfig(
            "full", shapes["conv_in.weight"][1], widths, per_level,
            kernel_size=shapes["body.0.block2.weight"][2],
            conv_downsample=any(key.endswith("down_opt.op.weight") for key in shapes))
    if "body.0.in_conv.weight" in shapes:
        levels = _count(shapes, r"body\.(\d+)\.out_conv\.weight")
        widths = tuple(shapes[f"body.{level}.out_conv.weight"][0] for level in range(levels))
        return AdapterConfig("light", shapes["body.0.in_conv.weight"][1], widths,
                             _count(shapes, r"body\.0\.body\.(\d+)\.block1\.weight"))
    raise AdapterLayoutError("no conv_in.weight (full adapter) or body.0.in_conv.weight (light "
                             "adapter) found; this is not a T2I-Adapter Loom can load")


def _count(shapes: Mapping[str, object], pattern: str) -> int:
    compiled = re.compile(pattern)
    return len({match.group(1) for key in shapes if (match := compiled.fullmatch(key))})
