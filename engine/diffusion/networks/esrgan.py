"""ESRGAN's RRDBNet (Wang et al. 2018, "ESRGAN: Enhanced Super-Resolution Generative
Adversarial Networks") for the upscale-model nodes.

Module names mirror the BasicSR / Real-ESRGAN key layout (conv_first, body.N.rdb1.conv1, ...),
so those files load without renaming; the original ESRGAN layouts ("model.0", "model.1.sub.N"
and "RRDB_trunk.N") are renamed to it first. Sizes (blocks, channels, scale) come from the
weights' shapes. Other super-resolution architectures are refused with a clear error."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LEAKY_SLOPE = 0.2
RESIDUAL_SCALE = 0.2  # the paper's residual scaling beta (section 3.2)
# Key markers of architectures people put in upscale_models that this module cannot run.
FOREIGN_MARKERS = (
    ("layers.0.residual_group.blocks.0.conv_block", "HAT"),
    ("layers.0.blocks.0.attn.attns.0", "DAT"),
    ("layers.0.residual_group.blocks.0.attn", "SwinIR"),
    ("body.0.weight", "Real-ESRGAN compact (SRVGGNetCompact)"),
    ("block_1.c1_r.sk.weight", "SPAN"),
)


class UpscaleModelError(ValueError):
    """An upscale model file that is not (or not a supported variant of) ESRGAN's RRDBNet."""


@dataclass(frozen=True)
class RRDBConfig:
    """RRDBNet sizes. `upsamples` nearest x2 stages follow the trunk; x2/x1 Real-ESRGAN models
    pixel-unshuffle the input by `unshuffle` first, so scale = 2**upsamples / unshuffle."""

    in_nc: int = 3
    out_nc: int = 3
    nf: int = 64
    gc: int = 32
    num_blocks: int = 23
    upsamples: int = 2
    unshuffle: int = 1

    @property
    def scale(self) -> int:
        return 2**self.upsamples // self.unshuffle


def _conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, 1, 1)


def _lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, LEAKY_SLOPE)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs; each sees the block input and every earlier output."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.conv1 = _conv(nf, gc)
        self.conv2 = _conv(nf + gc, gc)
        self.conv3 = _conv(nf + 2 * gc, gc)
        self.conv4 = _conv(nf + 3 * gc, gc)
        self.conv5 = _conv(nf + 4 * gc, nf)

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(_lrelu(conv(torch.cat(features, 1))))
        return self.conv5(torch.cat(features, 1)) * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks inside a scaled residual."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(nf, gc)
        self.rdb2 = ResidualDenseBlock(nf, gc)
        self.rdb3 = ResidualDenseBlock(nf, gc)

    def forward(self, x: Tensor) -> Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """The ESRGAN generator; pixels [B, in_nc, H, W] -> [B, out_nc, H*scale, W*scale]."""

    def __init__(self, config: RRDBConfig) -> None:
        super().__init__()
        self.config = config
        self.conv_first = _conv(config.in_nc * config.unshuffle**2, config.nf)
        self.body = nn.Sequential(*(RRDB(config.nf, config.gc)
                                    for _ in range(config.num_blocks)))
        self.conv_body = _conv(config.nf, config.nf)
        for index in range(1, config.upsamples + 1):
            self.add_module(f"conv_up{index}", _conv(config.nf, config.nf))
        self.conv_hr = _conv(config.nf, config.nf)
        self.conv_last = _conv(config.nf, config.out_nc)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        factor = self.config.unshuffle
        if factor > 1:
            # pad to a multiple of the unshuffle factor, crop the surplus after
            x = F.pad(x, (0, -width % factor, 0, -height % factor), mode="replicate")
            x = F.pixel_unshuffle(x, factor)  # (B, C * factor**2, H / factor, W / factor)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for index in range(1, self.config.upsamples + 1):
            conv_up = getattr(self, f"conv_up{index}")
            feat = _lrelu(conv_up(F.interpolate(feat, scale_factor=2, mode="nearest")))
        out = self.conv_last(_lrelu(self.conv_hr(feat)))
        scale = self.config.scale
        return out[..., : height * scale, : width * scale]


# -- key layouts --------------------------------------------------------------------------------

_OLD_RDB = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)")
_OLD_TRUNK = re.compile(r"model\.1\.sub\.(\d+)\.(weight|bias)")
_OLD_CONV = re.compile(r"model\.(\d+)\.(weight|bias)")
_TRUNK_RDB = re.compile(r"RRDB_trunk\.(\d+)\.RDB(\d)\.conv(\d)\.(weight|bias)")
_TRUNK_NAMES = {"trunk_conv": "conv_body", "HRconv": "conv_hr", "upconv1": "conv_up1",
                "upconv2": "conv_up2", "upconv3": "conv_up3", "conv_first": "conv_first",
                "conv_last": "conv_last"}


def _from_old_esrgan(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The original ESRGAN sequential layout ("model.N") renamed to the BasicSR layout.

    model.0 is conv_first and model.1.sub the trunk (its last entry the trunk conv); the
    remaining numbered convs are the upsampling convs, then the HR conv and the last conv."""
    renamed: dict[str, Tensor] = {}
    tail: dict[int, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        if match := _OLD_RDB.fullmatch(key):
            block, rdb, conv, kind = match.groups()
            renamed[f"body.{block}.rdb{rdb}.conv{conv}.{kind}"] = tensor
        elif match := _OLD_TRUNK.fullmatch(key):
            renamed[f"conv_body.{match.group(2)}"] = tensor
        elif match := _OLD_CONV.fullmatch(key):
            tail.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        else:
            raise UpscaleModelError(f"unexpected key {key!r} in an old-layout ESRGAN model")
    indices = sorted(tail)
    if len(indices) < 3 or indices[0] != 0:
        raise UpscaleModelError(f"old-layout ESRGAN model has convs at model.{indices}; "
                                f"expected model.0, upsampling convs, an HR and a last conv")
    names = (["conv_first"] + [f"conv_up{n}" for n in range(1, len(indices) - 2)]
             + ["conv_hr", "conv_last"])
    for name, index in zip(names, indices, strict=True):
        renamed.update({f"{name}.{kind}": t for kind, t in tail[index].items()})
    return renamed


def _from_trunk_layout(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The later official ESRGAN layout (RRDB_trunk, trunk_conv, upconvN, HRconv) renamed."""
    renamed: dict[str, Tensor] = {}
    for key, tensor in state.items():
        if match := _TRUNK_RDB.fullmatch(key):
            block, rdb, conv, kind = match.groups()
            renamed[f"body.{block}.rdb{rdb}.conv{conv}.{kind}"] = tensor
            continue
        module, _, kind = key.rpartition(".")
        if module not in _TRUNK_NAMES:
            raise UpscaleModelError(f"unexpected key {key!r} in an RRDB_trunk-layout ESRGAN "
                                    f"model")
        renamed[f"{_TRUNK_NAMES[module]}.{kind}"] = tensor
    return renamed


def to_basicsr_layout(state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """`state` in the BasicSR names RRDBNet uses, whichever ESRGAN layout it came in."""
    state = {key.removeprefix("module."): tensor for key, tensor in state.items()}
    if "body.0.rdb1.conv1.weight" in state:
        return dict(state)
    if "model.1.sub.0.RDB1.conv1.0.weight" in state:
        return _from_old_esrgan(state)
    if "RRDB_trunk.0.RDB1.conv1.weight" in state:
        return _from_trunk_layout(state)
    raise UpscaleModelError(f"{source}: {describe_foreign(state)}; only ESRGAN / RRDBNet-family "
                            f"upscale models (ESRGAN, Real-ESRGAN x4plus/x2plus, BSRGAN and "
                            f"other RRDBNet finetunes) are supported")


def describe_foreign(state: Mapping[str, Tensor]) -> str:
    """What an unsupported file looks like: a recognised architecture or its first keys."""
    for marker, architecture in FOREIGN_MARKERS:
        if any(key.startswith(marker) for key in state):
            return f"this looks like a {architecture} model (found key {marker!r})"
    keys = sorted(state)[:4]
    return f"no ESRGAN/RRDBNet keys found ({len(state)} tensors, e.g. {keys})"


# -- config detection and loading -----------------------------------------------------------------

def detect_config(state: Mapping[str, Tensor], source: str) -> RRDBConfig:
    """RRDBNet sizes from BasicSR-layout weight shapes."""
    first = _shape(state, "conv_first.weight", source)
    last = _shape(state, "conv_last.weight", source)
    out_nc, nf = last[0], first[0]
    # Real-ESRGAN x2/x1 models pixel-unshuffle RGB by 2/4 (in = out * 4 or * 16 channels).
    unshuffle = {out_nc * 4: 2, out_nc * 16: 4}.get(first[1], 1)
    blocks = {int(key.split(".")[1]) for key in state if key.startswith("body.")}
    upsamples = sum(1 for key in state if re.fullmatch(r"conv_up\d+\.weight", key))
    if blocks != set(range(len(blocks))) or not blocks:
        raise UpscaleModelError(f"{source}: RRDB blocks {sorted(blocks)} are not numbered "
                                f"0..N-1; the file is damaged or not an RRDBNet")
    gc = _shape(state, "body.0.rdb1.conv1.weight", source)[0]
    return RRDBConfig(in_nc=first[1] // unshuffle**2, out_nc=out_nc, nf=nf, gc=gc,
                      num_blocks=len(blocks), upsamples=upsamples, unshuffle=unshuffle)


def _shape(state: Mapping[str, Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise UpscaleModelError(f"{source}: RRDBNet weight {key!r} is missing; the file is "
                                f"damaged or not an ESRGAN model")
    return tuple(state[key].shape)


def build_rrdbnet(state: Mapping[str, Tensor], source: str, dtype: torch.dtype = torch.float32,
                  device: torch.device | None = None) -> RRDBNet:
    """An eval-mode RRDBNet holding `state` (any supported ESRGAN layout)."""
    weights = to_basicsr_layout(state, source)
    config = detect_config(weights, source)
    with torch.device("meta"):
        net = RRDBNet(config)
    prepared = {key: tensor.to(device=device or "cpu", dtype=dtype)
                for key, tensor in weights.items()}
    missing, unexpected = net.load_state_dict(prepared, strict=False, assign=True)
    if missing or unexpected:
        raise UpscaleModelError(
            f"{source}: weights do not fit the detected RRDBNet {config}: {len(missing)} "
            f"missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    return net.eval().requires_grad_(False)
