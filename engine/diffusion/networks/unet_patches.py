"""Patch points inside the UNet: callables a MODEL carries that run at fixed places of one
forward pass, in ComfyUI's call signatures (so a custom-node pack's function fits unchanged).

Every callable gets the call's transformer options (`TransformerOptions`, ComfyUI's
``transformer_options`` / ``extra_options`` dict) as its last argument. The UNet fills it as it
walks: ``original_shape`` (the latent's [B, C, H, W]), ``block`` (("input", i), ("middle", 0) or
("output", i)), ``transformer_index`` (how many SpatialTransformers ran before this one),
``activations_shape`` ([B, C, h, w] of the map entering the current SpatialTransformer) and
``block_index`` (the transformer block within it). Guidance adds ``cond_or_uncond`` (per batch
chunk, 0 = positive, 1 = negative), ``sigmas`` (B,) and ``sample_sigmas`` (the run's schedule);
the attention points also see ``n_heads``, ``dim_head`` and ``attn_precision`` (None: attention
runs in the model's dtype).

Points, in the order a forward pass meets them (x: (B, T, C) tokens, h and hsp: (B, C, H, W)):

=============================  ===========================================================
attn1_patch / attn2_patch      ``(n, context, value, options) -> (n, context, value)``: the
                               normed tokens and what self-/cross-attention reads keys and
                               values from, before the projections
attn1_replace / attn2_replace  ``(q, k, v, options) -> out``: replaces the attention itself,
                               q/k/v and out (B, T, heads * dim_head) around to_q/k/v and
                               to_out; keyed by (block name, block number, block_index) or by
                               (block name, block number) for all transformer blocks there
attn1_output_patch / attn2_..  ``(out, options) -> out`` after to_out, before the residual add
middle_patch                   ``(x, options) -> x`` between self- and cross-attention (GLIGEN)
input_block_patch              ``(h, options) -> h`` on each input block's output
input_block_patch_after_skip   ``(h, options) -> h`` after that output was kept as the skip
middle_block_patch             ``(h, options) -> h`` on the middle block's output
output_block_patch             ``(h, hsp, options) -> (h, hsp)`` before h and its skip hsp are
                               concatenated (FreeU)
=============================  ===========================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any

from torch import Tensor

BlockId = tuple[str, int]  # ("input", 4), ("middle", 0), ("output", 2)
TransformerId = tuple[str, int, int]  # a block and the transformer block's index inside it
TransformerOptions = dict[str, Any]  # one call's options (module docstring lists the keys)

AttentionInputPatch = Callable[[Tensor, Tensor, Tensor, TransformerOptions],
                               tuple[Tensor, Tensor, Tensor]]
AttentionReplace = Callable[[Tensor, Tensor, Tensor, TransformerOptions], Tensor]
TokensPatch = Callable[[Tensor, TransformerOptions], Tensor]
BlockPatch = Callable[[Tensor, TransformerOptions], Tensor]
OutputBlockPatch = Callable[[Tensor, Tensor, TransformerOptions], tuple[Tensor, Tensor]]

BLOCK_NAMES = ("input", "middle", "output")
ATTENTION_POINTS = ("attn1_patch", "attn2_patch", "attn1_output_patch", "attn2_output_patch",
                    "middle_patch")
BLOCK_POINTS = ("input_block_patch", "input_block_patch_after_skip", "middle_block_patch",
                "output_block_patch")
REPLACE_POINTS = ("attn1", "attn2")


def _no_replacements() -> Mapping[BlockId | TransformerId, AttentionReplace]:
    return MappingProxyType({})


@dataclass(frozen=True, eq=False)
class UNetPatches:
    """The UNet's patch points (module docstring); each tuple runs in order. Immutable: the
    `adding` / `replacing_attention` methods return a new value, so clones never share edits."""

    attn1_patch: tuple[AttentionInputPatch, ...] = ()
    attn2_patch: tuple[AttentionInputPatch, ...] = ()
    attn1_output_patch: tuple[TokensPatch, ...] = ()
    attn2_output_patch: tuple[TokensPatch, ...] = ()
    middle_patch: tuple[TokensPatch, ...] = ()
    attn1_replace: Mapping[BlockId | TransformerId, AttentionReplace] = field(
        default_factory=_no_replacements)
    attn2_replace: Mapping[BlockId | TransformerId, AttentionReplace] = field(
        default_factory=_no_replacements)
    input_block_patch: tuple[BlockPatch, ...] = ()
    input_block_patch_after_skip: tuple[BlockPatch, ...] = ()
    middle_block_patch: tuple[BlockPatch, ...] = ()
    output_block_patch: tuple[OutputBlockPatch, ...] = ()

    @cached_property
    def empty(self) -> bool:
        return not self.touches_attention and not any(
            getattr(self, name) for name in BLOCK_POINTS)

    @cached_property
    def touches_attention(self) -> bool:
        """Whether any transformer block has to take the patched path."""
        return bool(any(getattr(self, name) for name in ATTENTION_POINTS)
                    or self.attn1_replace or self.attn2_replace)

    def adding(self, point: str, patch: Callable[..., Any]) -> UNetPatches:
        """A copy with `patch` run after the others at `point` (a name from the table)."""
        if point not in ATTENTION_POINTS + BLOCK_POINTS:
            raise ValueError(f"{point!r} is not a UNet patch point; use one of "
                             f"{', '.join(ATTENTION_POINTS + BLOCK_POINTS)}")
        if not callable(patch):
            raise TypeError(f"the {point} patch must be callable, got {type(patch).__name__}")
        return dataclasses.replace(self, **{point: (*getattr(self, point), patch)})

    def replacing_attention(self, which: str, key: BlockId | TransformerId,
                            replace: AttentionReplace) -> UNetPatches:
        """A copy whose `which` ("attn1" self-, "attn2" cross-attention) at `key` is `replace`."""
        if which not in REPLACE_POINTS:
            raise ValueError(f"{which!r} is not an attention to replace; use 'attn1' "
                             "(self-attention) or 'attn2' (cross-attention)")
        _check_block_key(key)
        if not callable(replace):
            raise TypeError(f"the {which} replacement must be callable, got "
                            f"{type(replace).__name__}")
        table = dict(getattr(self, f"{which}_replace"))
        table[key] = replace
        return dataclasses.replace(self, **{f"{which}_replace": MappingProxyType(table)})

    def merged(self, other: UNetPatches) -> UNetPatches:
        """These patches followed by `other`'s (replacements: `other` wins on the same key)."""
        changes: dict[str, Any] = {name: (*getattr(self, name), *getattr(other, name))
                                   for name in ATTENTION_POINTS + BLOCK_POINTS}
        for which in REPLACE_POINTS:
            name = f"{which}_replace"
            changes[name] = MappingProxyType({**getattr(self, name), **getattr(other, name)})
        return dataclasses.replace(self, **changes)


def _check_block_key(key: Any) -> None:
    valid = (isinstance(key, tuple) and len(key) in (2, 3) and key[0] in BLOCK_NAMES
             and all(isinstance(part, int) for part in key[1:]))
    if not valid:
        raise ValueError(f"attention key {key!r} is not (block, number) or (block, number, "
                         f"transformer block index) with block one of {', '.join(BLOCK_NAMES)}; "
                         "e.g. ('middle', 0) or ('input', 4, 1)")


@dataclass(frozen=True, eq=False)
class UNetCall:
    """One forward pass's patches and the options dict they are all handed (filled as the UNet
    walks its blocks). Made per call by guidance; never shared between calls."""

    patches: UNetPatches
    options: TransformerOptions

    def run_block_patches(self, point: str, h: Tensor) -> Tensor:
        for patch in getattr(self.patches, point):
            h = patch(h, self.options)
        return h

    def run_output_block_patches(self, h: Tensor, skip: Tensor) -> tuple[Tensor, Tensor]:
        for patch in self.patches.output_block_patch:
            h, skip = patch(h, skip, self.options)
        return h, skip
