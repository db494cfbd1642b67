"""The encoding rules of a checkpoint's text side: one or two CLIP encoders, their tokenizers,
clip skip, and ComfyUI's `encode_from_tokens` (per-window encoding, token weights,
concatenation). Reading the encoders' weights from files is checkpoints/text_encoders.py.

Facts this follows (ComfyUI sd1_clip.py / sd2_clip.py / sdxl_clip.py):

* Which hidden state (`layer_norm_hidden_state` is whether the final LayerNorm is applied
  to a chosen non-last layer):
  - SD1 CLIP-L: the last layer after final_layer_norm; clip skip -2 etc. is also normed.
  - SD2 ViT-H: the penultimate layer (-2) after ln_final.
  - SDXL clip_l and clip_g: the penultimate layer (-2) WITHOUT the final LayerNorm;
    a clip skip of -1 gives the last block's output, also un-normed.
  - A clip skip beyond an encoder's depth (|idx| > layers) falls back to the normed last layer.
* Padding: CLIP-L windows pad with the end token 49407, the OpenCLIP encoders with 0.
* Pooled: the final-normed last layer at the first end token of the FIRST window; CLIP-L
  unprojected (SD1), OpenCLIP through text_projection (SD2 1024, SDXL/refiner bigG 1280).
  Token weights never change the pooled vector.
* Weights ("comfy" mode), per encoder and per window: when any token weight != 1, the empty
  prompt's window [start, end, pad...] is encoded too, and each token j of weight w != 1
  becomes z[j] = (z[j] - z_empty[j]) * w + z_empty[j] (same position j of the empty window).
* SDXL: cond = cat([clip_l, clip_g], -1) (768 + 1280 = 2048) after cutting both to the
  shorter token length; pooled comes from clip_g.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from engine.diffusion.memory.offload import compute_device
from engine.diffusion.networks.clip_text import END_TOKEN, end_positions
from engine.diffusion.patches.hooks import HookGroup, clip_schedule, scaled
from engine.diffusion.patches.patching import Patch, patched
from engine.diffusion.text.prompt_weights import EmbeddingFinder
from engine.diffusion.text.tokenizer import (
    ClipBpe,
    ClipTokenizer,
    TokenizedText,
    Window,
    WindowSpec,
)

# Placeholder id under a textual-inversion vector (its embedding row is replaced).
_EMBEDDING_PLACEHOLDER = 0


@dataclass(frozen=True)
class EncoderSpec:
    """How ComfyUI runs one text encoder inside a model family."""

    name: str  # ComfyUI's token-dict key: "l", "h" or "g"
    architecture: str  # "clip_l", "vit_h" or "vit_bigg"
    pad_token: int
    default_layer_idx: int | None  # None: the last layer after the final LayerNorm
    normalize_hidden: bool  # final LayerNorm on a chosen non-last layer
    embedding_key: str  # tensor picked from multi-encoder embedding files


@dataclass(frozen=True)
class FamilySpec:
    encoders: tuple[EncoderSpec, ...]  # features concatenated in this order
    pooled_from: str


_CLIP_L_SD1 = EncoderSpec("l", "clip_l", END_TOKEN, None, True, "clip_l")
# ComfyUI's SD2 tokenizer keeps the default embedding key "clip_l" (its files are single-tensor)
_VIT_H_SD2 = EncoderSpec("h", "vit_h", 0, -2, True, "clip_l")
_CLIP_L_SDXL = EncoderSpec("l", "clip_l", END_TOKEN, -2, False, "clip_l")
_BIGG_SDXL = EncoderSpec("g", "vit_bigg", 0, -2, False, "clip_g")

FAMILIES: Mapping[str, FamilySpec] = MappingProxyType({
    "sd1": FamilySpec((_CLIP_L_SD1,), "l"),
    "sd2": FamilySpec((_VIT_H_SD2,), "h"),
    "sdxl": FamilySpec((_CLIP_L_SDXL, _BIGG_SDXL), "g"),
    "sdxl_refiner": FamilySpec((_BIGG_SDXL,), "g"),
})


def family_spec(family: str) -> FamilySpec:
    if family not in FAMILIES:
        raise ValueError(f"unknown text-encoder family {family!r}; use one of {sorted(FAMILIES)}")
    return FAMILIES[family]


@dataclass(frozen=True)
class PromptTokens:
    """Weighted windows per encoder name (each window exactly 77 tokens) and user warnings."""

    windows: Mapping[str, tuple[Window, ...]]
    warnings: tuple[str, ...] = ()


class EncodedPrompt(NamedTuple):
    cond: Tensor  # (1, 77 * windows, width) float32; width 768 / 1024 / 2048 / 1280
    pooled: Tensor  # (1, pooled width) float32, from the first window
    warnings: tuple[str, ...]


class TextEncoderStack:
    """The CLIP handle of a checkpoint: encoders, tokenizers and the clip-skip setting.

    Never mutated after construction: `clone_with_layer` returns a new handle that shares
    the encoder modules.
    """

    def __init__(self, family: str, encoders: Mapping[str, nn.Module], bpe: ClipBpe, *,
                 find_embedding: EmbeddingFinder | None = None,
                 layer_idx: int | None = None,
                 patches: Mapping[str, Sequence[Patch]] | None = None) -> None:
        self.spec = family_spec(family)
        self.family = family
        expected = [encoder.name for encoder in self.spec.encoders]
        if sorted(encoders) != sorted(expected):
            raise ValueError(f"family {family!r} needs encoders {expected}, got {sorted(encoders)}")
        self.encoders = MappingProxyType(dict(encoders))
        self.tokenizers = MappingProxyType({
            spec.name: ClipTokenizer(bpe, _window_spec(spec, encoders[spec.name]), find_embedding)
            for spec in self.spec.encoders})
        self.layer_idx = layer_idx
        # per encoder, applied around every use (LoRA, merges); see patches/patching.py
        self.patches: Mapping[str, tuple[Patch, ...]] = MappingProxyType(
            {name: tuple(found) for name, found in (patches or {}).items()})
        # SetClipHooks: weight hooks applied while encoding (per range when scheduled), and
        # the hooks every encoded entry carries into sampling (patches/hooks.py)
        self.hooks: HookGroup | None = None
        self.hooks_to_conds: HookGroup | None = None
        self.schedule_hooks = False

    def clone_with_layer(self, layer_idx: int | None) -> TextEncoderStack:
        """The same encoders with another clip skip (CLIPSetLastLayer's stop_at_clip_layer)."""
        clone = copy.copy(self)
        clone.layer_idx = layer_idx
        return clone

    def clone_with_patches(self, patches: Mapping[str, Patch]) -> TextEncoderStack:
        """The same encoders with one more patch for each named encoder (after earlier ones)."""
        unknown = sorted(set(patches) - set(self.encoders))
        if unknown:
            raise ValueError(f"patches for text encoders {unknown}, but this {self.family} CLIP "
                             f"has {sorted(self.encoders)}")
        clone = copy.copy(self)
        clone.patches = MappingProxyType({
            name: self.patches.get(name, ()) + ((patches[name],) if name in patches else ())
            for name in self.encoders})
        return clone

    def clone_with_hooks(self, hooks: HookGroup, apply_to_conds: bool,
                         schedule: bool) -> TextEncoderStack:
        """The same encoders encoding under `hooks` (SetClipHooks); without `schedule` their
        keyframes are dropped (constant strength), with it every keyframe range is encoded."""
        clone = copy.copy(self)
        clone.hooks = hooks if schedule else hooks.with_keyframes(None)
        clone.hooks_to_conds = hooks if apply_to_conds else None
        clone.schedule_hooks = schedule
        return clone

    def encode_scheduled(self, tokens: PromptTokens) -> list[tuple[EncodedPrompt, dict[str, Any]]]:
        """One encoding, or one per range of the hooks' keyframe schedule, each with the
        options it adds to its CONDITIONING entry (hooks, clip_start/end_percent)."""
        carried = {} if self.hooks_to_conds is None else {"hooks": self.hooks_to_conds}
        if self.hooks is None or not self.schedule_hooks:
            return [(self.encode_tokens(tokens), carried)]
        return [(self.encode_tokens(tokens, strengths),
                 {"clip_start_percent": start, "clip_end_percent": end, **carried})
                for (start, end), strengths in clip_schedule(self.hooks)]

    def _hook_patches(self, name: str, strengths: Mapping[object, float] | None
                      ) -> tuple[Patch, ...]:
        if self.hooks is None:
            return ()
        found: list[Patch] = []
        for hook in self.hooks.hooks:
            patch = hook.text_patches({name: self.encoders[name]}).get(name)
            strength = 1.0 if strengths is None else strengths.get(hook.ref, 1.0)
            if patch is not None and strength != 0:
                found.append(scaled(patch, strength))
        return tuple(found)

    def tokenize(self, text: str) -> PromptTokens:
        """The same text for every encoder (CLIPTextEncode); window counts may differ, and
        encode_tokens then cuts to the shortest, as ComfyUI does."""
        return self._tokenize({spec.name: text for spec in self.spec.encoders}, pad=False)

    def tokenize_per_encoder(self, texts: Mapping[str, str]) -> PromptTokens:
        """Each encoder its own text (CLIPTextEncodeSDXL: {"g": text_g, "l": text_l}).

        Shorter window lists are padded with empty-prompt windows to the longest, as ComfyUI's
        SDXL node does.
        """
        names = [spec.name for spec in self.spec.encoders]
        if sorted(texts) != sorted(names):
            raise ValueError(f"this {self.family} CLIP has encoders {names}; got texts for "
                             f"{sorted(texts)}")
        return self._tokenize(texts, pad=True)

    def _tokenize(self, texts: Mapping[str, str], *, pad: bool) -> PromptTokens:
        tokenized = {name: self.tokenizers[name].tokenize(text) for name, text in texts.items()}
        count = max(len(result.windows) for result in tokenized.values()) if pad else 0
        windows = {name: _pad_windows(result, self.tokenizers[name].empty(), count)
                   for name, result in tokenized.items()}
        warnings = [w for result in tokenized.values() for w in result.warnings]
        return PromptTokens(MappingProxyType(windows), tuple(dict.fromkeys(warnings)))

    def encode(self, text: str) -> EncodedPrompt:
        return self.encode_tokens(self.tokenize(text))

    def encode_tokens(self, tokens: PromptTokens,
                      hook_strengths: Mapping[object, float] | None = None,
                      projected_pooled: bool = True) -> EncodedPrompt:
        """Every encoder's windows, concatenated; hooks (if any) at `hook_strengths` by ref.
        `projected_pooled` False gives the pooled vector before OpenCLIP's text_projection
        (ComfyUI's "unprojected", what GLIGEN reads; CLIP-L has no projection, so SD1 gets the
        same vector either way)."""
        conds, pooled = [], None
        for spec in self.spec.encoders:
            cond, encoder_pooled = self._encode_windows(spec, tokens.windows[spec.name],
                                                        hook_strengths, projected_pooled)
            conds.append(cond)
            if spec.name == self.spec.pooled_from:
                pooled = encoder_pooled
        length = min(cond.shape[1] for cond in conds)
        cond = torch.cat([cond[:, :length] for cond in conds], dim=-1)
        return EncodedPrompt(cond, pooled, tokens.warnings)

    def layer_choice(self, spec: EncoderSpec) -> tuple[int | None, bool]:
        """(layer_idx for the model, normalize_hidden) for one encoder under this clip skip."""
        layer_idx = spec.default_layer_idx if self.layer_idx is None else self.layer_idx
        layers = self.encoders[spec.name].config.layers
        if layer_idx is None or abs(layer_idx) > layers:
            return None, True
        return layer_idx, spec.normalize_hidden

    def _encode_windows(self, spec: EncoderSpec, windows: tuple[Window, ...],
                        hook_strengths: Mapping[object, float] | None = None,
                        projected_pooled: bool = True) -> tuple[Tensor, Tensor]:
        model = self.encoders[spec.name]
        patches = self.patches.get(spec.name, ()) + self._hook_patches(spec.name, hook_strengths)
        weighted = any(weight != 1.0 for window in windows for _, weight in window)
        batch = list(windows)
        if weighted:
            batch.append(self.tokenizers[spec.name].empty().windows[0])
        layer_idx, normalize_hidden = self.layer_choice(spec)
        with torch.no_grad(), patched(model, patches):
            ids, token_embeds = window_inputs(model, batch)
            out = model(ids, token_embeds=token_embeds, layer_idx=layer_idx,
                        normalize_hidden=normalize_hidden)
            hidden = out.hidden.float()  # (N, 77, width)
            z = hidden[: len(windows)]
            if weighted:
                weights = torch.tensor([[w for _, w in window] for window in windows],
                                       dtype=torch.float32, device=z.device).unsqueeze(-1)
                empty = hidden[-1]  # (77, width)
                z = torch.where(weights != 1.0, (z - empty) * weights + empty, z)
            cond = z.reshape(1, -1, z.shape[-1])  # (1, 77 * windows, width)
            pooled = out.pooled[0:1] if projected_pooled else \
                out.last[0:1][:, end_positions(ids[0:1])[0]]  # (1, width) first window
            return cond.clone(), pooled.float().clone()


def _window_spec(spec: EncoderSpec, model: nn.Module) -> WindowSpec:
    return WindowSpec(pad_token=spec.pad_token, width=model.config.width,
                      embedding_key=spec.embedding_key)


def _pad_windows(result: TokenizedText, empty: TokenizedText, count: int) -> tuple[Window, ...]:
    missing = max(0, count - len(result.windows))
    return tuple(result.windows) + tuple(empty.windows) * missing


def window_inputs(model: nn.Module, windows: list[Window]) -> tuple[Tensor, Tensor | None]:
    """(N, 77) ids and, when a window holds embedding vectors, (N, 77, width) token embeddings."""
    device = compute_device(model)
    ids = torch.tensor([[token if isinstance(token, int) else _EMBEDDING_PLACEHOLDER
                         for token, _ in window] for window in windows],
                       dtype=torch.long, device=device)
    vectors = [(row, column, token) for row, window in enumerate(windows)
               for column, (token, _) in enumerate(window) if not isinstance(token, int)]
    if not vectors:
        return ids, None
    token_embeds = model.embed_tokens(ids).clone()  # (N, 77, width)
    for row, column, vector in vectors:
        token_embeds[row, column] = vector.to(device=device, dtype=token_embeds.dtype)
    return ids, token_embeds
