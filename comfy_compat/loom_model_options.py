"""ComfyUI's `model_options` (what packs' ModelPatcher setters write) as Loom's typed
ModelPatches. The callables keep ComfyUI's signatures on both sides, so each entry moves over
unchanged; an entry Loom has no patch point for is an UnsupportedPatchError naming it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from engine.diffusion.networks.unet_patches import ATTENTION_POINTS, BLOCK_POINTS, REPLACE_POINTS
from engine.diffusion.patches.model_patches import ModelPatches

GROUPS = ("patches", "patches_replace")


class UnsupportedPatchError(NotImplementedError):
    """A ComfyUI-style model patch that Loom's UNet and guidance have no place for."""


def translate(model_options: Mapping[str, Any], base: ModelPatches) -> ModelPatches:
    """`base` plus every patch of `model_options` (ComfyUI's layout)."""
    unsupported: list[str] = []
    patches = _guidance(model_options, base)
    transformer = model_options.get("transformer_options") or {}
    for point, found in (transformer.get("patches") or {}).items():
        if point not in ATTENTION_POINTS + BLOCK_POINTS:
            unsupported.append(f"transformer_options.patches.{point}")
            continue
        for patch in found:
            patches = patches.adding_unet_patch(point, patch)
    for which, table in (transformer.get("patches_replace") or {}).items():
        if which not in REPLACE_POINTS:
            unsupported.append(f"transformer_options.patches_replace.{which}")
            continue
        for key, replace in table.items():
            patches = patches.replacing_attention(which, key, replace)
    extra = {k: v for k, v in transformer.items() if k not in GROUPS}
    if extra:
        patches = patches.with_transformer_options(**extra)
    if unsupported:
        raise UnsupportedPatchError(
            f"this MODEL carries ComfyUI model patches Loom has no patch point for: "
            f"{', '.join(unsupported)}; remove the node that adds them")
    return patches


def _guidance(options: Mapping[str, Any], patches: ModelPatches) -> ModelPatches:
    """The patch points around the UNet call: wrapper, denoise mask, pre/post/CFG functions."""
    no_cfg1 = bool(options.get("disable_cfg1_optimization", False))
    steps: list[tuple[str, Callable[[ModelPatches, Any], ModelPatches]]] = [
        ("model_function_wrapper", lambda p, f: p.with_model_function_wrapper(f)),
        ("denoise_mask_function", lambda p, f: p.with_denoise_mask_function(f)),
        ("sampler_cfg_function", lambda p, f: p.with_cfg_function(f, no_cfg1)),
    ]
    for name, apply in steps:
        if options.get(name) is not None:
            patches = apply(patches, options[name])
    for function in options.get("sampler_pre_cfg_function") or ():
        patches = patches.adding_pre_cfg(function, no_cfg1)
    for function in options.get("sampler_post_cfg_function") or ():
        patches = patches.adding_post_cfg(function, no_cfg1)
    if no_cfg1:
        patches = dataclasses.replace(patches, disable_cfg1_optimization=True)
    return patches
