"""Tensor helpers shared by the image and latent nodes: resizing with ComfyUI's methods
(nearest-exact, bilinear, area, bicubic, lanczos, bislerp), centre crops, and tensor <-> Pillow."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.image_ops import center_crop, repeat_to_batch

MAX_RESOLUTION = 16384  # ComfyUI's largest width/height/offset widget value, in pixels
IMAGE_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
LATENT_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
CROP_METHODS = ("disabled", "center")
_TORCH_MODES = ("nearest-exact", "bilinear", "area", "bicubic")
# Cosine limits past which slerp's sin(omega) denominator is unusable (ComfyUI's tolerances).
_PARALLEL_DOT = 1 - 1e-5
_OPPOSITE_DOT = 1e-5 - 1


def resize(samples: torch.Tensor, width: int, height: int, method: str,
           crop: str = "disabled") -> torch.Tensor:
    """`samples` [N, C, H, W] resized to height x width; crop "center" keeps the aspect ratio."""
    if width < 1 or height < 1:
        raise ValueError(f"cannot resize to {width}x{height}; width and height must be >= 1")
    if crop not in CROP_METHODS:
        raise ValueError(f"unknown crop {crop!r}; use one of {CROP_METHODS}")
    if crop == "center":
        samples = center_crop(samples, width, height)
    if method == "bislerp":
        return bislerp(samples, width, height)
    if method == "lanczos":
        return lanczos(samples, width, height)
    if method in _TORCH_MODES:
        return F.interpolate(samples, size=(height, width), mode=method)
    known = sorted(set(IMAGE_UPSCALE_METHODS + LATENT_UPSCALE_METHODS))
    raise ValueError(f"unknown upscale method {method!r}; use one of {known}")


def resize_image(image: torch.Tensor, width: int, height: int, method: str,
                 crop: str = "disabled") -> torch.Tensor:
    """An IMAGE [B, H, W, C] resized like `resize`."""
    channels_first = image.movedim(-1, 1)
    return resize(channels_first, width, height, method, crop).movedim(1, -1).contiguous()


def lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Pillow's Lanczos filter on each 8-bit channel plane (what ComfyUI's images get)."""
    batch, channels = samples.shape[:2]
    out = torch.empty((batch, channels, height, width), dtype=torch.float32)
    planes = to_uint8(samples.detach().cpu().float())
    for index in range(batch):
        for channel in range(channels):
            plane = Image.fromarray(planes[index, channel])
            resized = plane.resize((width, height), resample=Image.Resampling.LANCZOS)
            out[index, channel] = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)
    return out.to(samples.dtype)


def slerp(start: torch.Tensor, end: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of row vectors [M, C] at `ratio` [M, 1]; norms go linearly.

    Nearly parallel rows keep `start`, nearly opposite rows are lerped (as ComfyUI does)."""
    start_norm = start.norm(dim=-1, keepdim=True)
    end_norm = end.norm(dim=-1, keepdim=True)
    start_dir = torch.where(start_norm > 0, start / start_norm, torch.zeros_like(start))
    end_dir = torch.where(end_norm > 0, end / end_norm, torch.zeros_like(end))
    dot = (start_dir * end_dir).sum(dim=-1, keepdim=True)
    omega = torch.acos(dot.clamp(-1.0, 1.0))
    direction = (torch.sin((1.0 - ratio) * omega) * start_dir
                 + torch.sin(ratio * omega) * end_dir) / torch.sin(omega)
    result = direction * (start_norm * (1.0 - ratio) + end_norm * ratio)
    result = torch.where(dot > _PARALLEL_DOT, start, result)
    return torch.where(dot < _OPPOSITE_DOT, start * (1.0 - ratio) + end * ratio, result)


def linear_taps(old: int, new: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each of `new` positions: the lower and upper source index and the ratio between them.

    Half-pixel centres clamped at the edges: bilinear resize's sampling (align_corners off)."""
    scale = old / new
    position = ((torch.arange(new, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0.0)
    lower = position.floor().long().clamp(max=old - 1)
    upper = (lower + 1).clamp(max=old - 1)
    return lower, upper, position - lower.float()


def _slerp_width(samples: torch.Tensor, width: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, H, width], slerping neighbouring C-vectors along W."""
    batch, channels, rows, old_width = samples.shape
    if width == old_width:
        return samples
    lower, upper, ratio = linear_taps(old_width, width)
    vectors = samples.movedim(1, -1)  # (N, H, W, C)
    start = vectors[:, :, lower].reshape(-1, channels)  # (N * H * width, C)
    end = vectors[:, :, upper].reshape(-1, channels)
    ratios = ratio.expand(batch, rows, width).reshape(-1, 1)
    blended = slerp(start, end, ratios)
    return blended.reshape(batch, rows, width, channels).movedim(-1, 1)


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bilinear resize where each 1-D blend slerps latent vectors (width pass, then height)."""
    values = samples.float()
    values = _slerp_width(values, width)
    values = _slerp_width(values.transpose(-1, -2), height).transpose(-1, -2)
    return values.contiguous().to(samples.dtype)


def to_uint8(values: torch.Tensor) -> np.ndarray:
    """0..1 floats as 0..255 bytes, truncated after clipping (ComfyUI's PNG conversion)."""
    return np.clip(255.0 * values.detach().cpu().float().numpy(), 0, 255).astype(np.uint8)


def image_to_pil(image: torch.Tensor) -> Image.Image:
    """One image [H, W, C] (C = 1, 2, 3 or 4) as a Pillow image (L, LA, RGB or RGBA)."""
    pixels = to_uint8(image)
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    return Image.fromarray(pixels)


def repeat_batch(values: torch.Tensor, times: int) -> torch.Tensor:
    """The whole batch `times` over along dim 0 (a new tensor)."""
    return values.repeat(times, *([1] * (values.dim() - 1)))


def paste_masked(destination: torch.Tensor, source: torch.Tensor, x: int, y: int,
                 mask: torch.Tensor | None = None, multiplier: int = 1,
                 resize_source: bool = False) -> torch.Tensor:
    """`source` [B, C, h, w] blended into a copy of `destination` [B, C, H, W] at pixel (x, y)
    (cell x // multiplier for latents) by `mask` (1 = source; any size, resized bilinearly to
    the source); the part outside the destination is cut off (ComfyUI's composite)."""
    out = destination.clone()
    height, width = out.shape[-2:]
    if resize_source:
        source = F.interpolate(source, size=(height, width), mode="bilinear")
    source = repeat_to_batch(source.to(out.dtype), out.shape[0])
    left = min(x, width * multiplier) // multiplier
    top = min(y, height * multiplier) // multiplier
    rows, cols = min(source.shape[-2], height - top), min(source.shape[-1], width - left)
    if rows <= 0 or cols <= 0:
        return out
    if mask is None:
        weight = torch.ones_like(source)
    else:
        weight = F.interpolate(mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).to(out),
                               size=tuple(source.shape[-2:]), mode="bilinear")
        weight = repeat_to_batch(weight, source.shape[0])
    weight = weight[..., :rows, :cols]
    region = out[..., top:top + rows, left:left + cols]
    out[..., top:top + rows, left:left + cols] = weight * source[..., :rows, :cols] + \
        (1.0 - weight) * region
    return out


def match_alpha(destination: torch.Tensor, source: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGEs [..., C] given the destination's channel count: extra source channels dropped,
    a missing alpha added as opaque."""
    channels = destination.shape[-1]
    if source.shape[-1] > channels:
        source = source[..., :channels]
    elif source.shape[-1] < channels:
        source = F.pad(source, (0, channels - source.shape[-1]), value=1.0)
    return destination, source
