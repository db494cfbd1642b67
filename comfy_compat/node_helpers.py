"""ComfyUI's `node_helpers` for custom-node packs."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from PIL import ImageFile, UnidentifiedImageError

T = TypeVar("T")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def conditioning_set_values(conditioning: list[Any], values: Mapping[str, Any] | None = None,
                            append: bool = False) -> list[list[Any]]:
    """A copy of CONDITIONING with `values` set on every entry (appended to lists when asked)."""
    out = []
    for cond, options in conditioning:
        changed = dict(options)
        for key, value in (values or {}).items():
            if append and key in changed and changed[key] is not None:
                changed[key] = changed[key] + value
            else:
                changed[key] = value
        out.append([cond, changed])
    return out


def pillow(fn: Callable[[Any], T], arg: Any) -> T:
    """Call a Pillow function, retrying once with truncated images allowed (ComfyUI's rule)."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        return fn(arg)
    except (OSError, UnidentifiedImageError, ValueError):
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        return fn(arg)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def hasher() -> Callable[..., Any]:
    from comfy.cli_args import args
    name = getattr(args, "default_hashing_function", "sha256")
    return getattr(hashlib, name, hashlib.sha256)


def string_to_torch_dtype(string: str) -> torch.dtype:
    if string not in DTYPES:
        raise ValueError(f"unknown dtype name {string!r}; use one of {sorted(DTYPES)}")
    return DTYPES[string]


def image_alpha_fix(destination: torch.Tensor, source: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Give both images the same channel count (an opaque alpha where one lacks it)."""
    if destination.shape[-1] < source.shape[-1]:
        source = source[..., :destination.shape[-1]]
    elif destination.shape[-1] > source.shape[-1]:
        pad = torch.ones_like(source[..., :1])
        source = torch.cat([source, pad.expand(*source.shape[:-1],
                                               destination.shape[-1] - source.shape[-1])], -1)
    return destination, source
