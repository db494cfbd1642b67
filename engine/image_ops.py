"""Tensor image operations shared by nodes and the model stack."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor


def center_crop(samples: Tensor, width: int, height: int) -> Tensor:
    """The middle of `samples` [..., H, W] cut to the aspect ratio of width x height (the crop
    ComfyUI applies before resizing hints, masks and "center" upscales)."""
    old_height, old_width = samples.shape[-2], samples.shape[-1]
    old_aspect, new_aspect = old_width / old_height, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_width - old_width * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_height - old_height * (old_aspect / new_aspect)) / 2)
    return samples[..., y:old_height - y, x:old_width - x]


def resize_center(samples: Tensor, height: int, width: int) -> Tensor:
    """(N, C, h, w) -> (N, C, height, width): centre crop to the aspect ratio, then bilinear
    (ComfyUI's common_upscale with "bilinear", "center")."""
    return F.interpolate(center_crop(samples, width, height), size=(height, width),
                         mode="bilinear")


def spread_to_batch(values: Tensor, batch: int) -> Tensor:
    """`values` resampled along dim 0 to `batch` entries by nearest index (ComfyUI's
    resize_to_batch_size: each output takes the input at its centre's position)."""
    count = values.shape[0]
    if count == batch:
        return values
    if batch <= 1:
        return values[:batch]
    if batch < count:
        scale = (count - 1) / (batch - 1)
        indices = [min(round(i * scale), count - 1) for i in range(batch)]
    else:
        scale = count / batch
        indices = [min(math.floor((i + 0.5) * scale), count - 1) for i in range(batch)]
    return values[indices]


def repeat_to_batch(values: Tensor, batch: int) -> Tensor:
    """`values` cut or repeated along dim 0 to `batch` entries (ComfyUI's batch fitting)."""
    count = values.shape[0]
    if count > batch:
        return values[:batch]
    if count < batch:
        repeats = [math.ceil(batch / count)] + [1] * (values.ndim - 1)
        return values.repeat(repeats)[:batch]
    return values
