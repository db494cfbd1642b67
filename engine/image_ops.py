"""Tensor image operations shared by nodes and the model stack."""

from __future__ import annotations

import math

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


def repeat_to_batch(values: Tensor, batch: int) -> Tensor:
    """`values` cut or repeated along dim 0 to `batch` entries (ComfyUI's batch fitting)."""
    count = values.shape[0]
    if count > batch:
        return values[:batch]
    if count < batch:
        repeats = [math.ceil(batch / count)] + [1] * (values.ndim - 1)
        return values.repeat(repeats)[:batch]
    return values
