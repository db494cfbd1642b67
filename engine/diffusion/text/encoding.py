"""A checkpoint's text side: one or two CLIP encoders, their tokenizers, clip skip, and
ComfyUI's `encode_from_tokens` (per-window encoding, token weights, concatenation).

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
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import torch
from torch import Tensor, nn

from engine.diffusion.memory.offload import compute_device
from engine.diffusion.networks.clip_text import END_TOKEN, ClipTextModel, TextEncoderConfig
from engine.diffusion.networks.openclip_text import INITIAL_LOGIT_SCALE, OpenClipTextModel
from engine.diffusion.patches.patching import Patch, patched
from engine.diffusion.text.prompt_weights import EmbeddingFinder
from engine.diffusion.text.tokenizer import (
    ClipBpe,
    ClipTokenizer,
    TokenizedText,
    Window,
    WindowSpec,
)

logger = logging.getLogger("loom.clip")

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

    def encode_tokens(self, tokens: PromptTokens) -> EncodedPrompt:
        conds, pooled = [], None
        for spec in self.spec.encoders:
            cond, encoder_pooled = self._encode_windows(spec, tokens.windows[spec.name])
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

    def _encode_windows(self, spec: EncoderSpec, windows: tuple[Window, ...]
                        ) -> tuple[Tensor, Tensor]:
        model = self.encoders[spec.name]
        weighted = any(weight != 1.0 for window in windows for _, weight in window)
        batch = list(windows)
        if weighted:
            batch.append(self.tokenizers[spec.name].empty().windows[0])
        layer_idx, normalize_hidden = self.layer_choice(spec)
        with torch.no_grad(), patched(model, self.patches.get(spec.name, ())):
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
            return cond.clone(), out.pooled[0:1].float().clone()


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


# --- loading from checkpoints and from text-encoder files -----------------------------------

# Where each encoder sits in a single-file checkpoint; the first prefix with keys wins. Old SD1
# merges leave out `text_model.`, hence the shorter CLIP-L prefixes.
CHECKPOINT_PREFIXES: Mapping[tuple[str, str], tuple[str, ...]] = MappingProxyType({
    ("sd1", "l"): ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."),
    ("sd2", "h"): ("cond_stage_model.model.",),
    ("sdxl", "l"): ("conditioner.embedders.0.transformer.text_model.",
                    "conditioner.embedders.0.transformer."),
    ("sdxl", "g"): ("conditioner.embedders.1.model.",),
    ("sdxl_refiner", "g"): ("conditioner.embedders.0.model.",),
})
_HEAD_WIDTH = 64  # every released tower: 768 / 12, 1024 / 16, 1280 / 20
_ACTIVATIONS = MappingProxyType({"clip_l": "quick_gelu", "vit_h": "gelu", "vit_bigg": "gelu"})
_ARCHITECTURE_BY_WIDTH = MappingProxyType({768: "clip_l", 1024: "vit_h", 1280: "vit_bigg"})
_FAMILY_BY_ARCHITECTURES = MappingProxyType({
    ("clip_l",): "sd1", ("vit_h",): "sd2", ("vit_bigg",): "sdxl_refiner",
    ("clip_l", "vit_bigg"): "sdxl"})
_HF_TO_OPENCLIP_TOP = MappingProxyType({
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection"})
# HF CLIPTextModel layer names -> OpenCLIP resblock names (for HF-format bigG/ViT-H files).
_HF_TO_OPENCLIP_LAYER = MappingProxyType({
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"})


def load_text_encoder_state(family: str, state_dict: Mapping[str, Tensor], bpe: ClipBpe, *,
                            find_embedding: EmbeddingFinder | None = None,
                            dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                            configs: Mapping[str, TextEncoderConfig] | None = None
                            ) -> TextEncoderStack:
    """The text side of a checkpoint (full state dict, prefixes as stored) as a CLIP handle.

    A one-encoder family also accepts a bare text-encoder state dict. `configs` (by encoder
    name) overrides the shapes read from the weights (tiny test models).
    """
    spec = family_spec(family)
    encoders = {}
    for encoder in spec.encoders:
        weights = _checkpoint_encoder_state(family, encoder, state_dict)
        config = None if configs is None else configs.get(encoder.name)
        encoders[encoder.name] = build_text_encoder(encoder.architecture, weights, dtype=dtype,
                                                    device=device, config=config)
    return TextEncoderStack(family, encoders, bpe, find_embedding=find_embedding)


def load_text_encoder_files(state_dicts: list[Mapping[str, Tensor]], bpe: ClipBpe, *,
                            find_embedding: EmbeddingFinder | None = None,
                            dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                            architectures: list[str] | None = None,
                            configs: Mapping[str, TextEncoderConfig] | None = None
                            ) -> TextEncoderStack:
    """A CLIP handle from separate text-encoder files (CLIPLoader, DualCLIPLoader).

    Each file is HF `CLIPTextModel(WithProjection)` naming (with or without `text_model.`) or
    OpenCLIP naming; the family follows from what they are: clip_l -> sd1, ViT-H -> sd2,
    bigG -> sdxl_refiner, clip_l + bigG -> sdxl.
    """
    kinds = architectures or [detect_text_encoder_architecture(sd) for sd in state_dicts]
    if len(kinds) != len(state_dicts):
        raise ValueError(f"{len(state_dicts)} files but {len(kinds)} architectures given")
    family = family_for_architectures(kinds)
    by_architecture = {encoder.architecture: encoder for encoder in family_spec(family).encoders}
    encoders = {}
    for state_dict, kind in zip(state_dicts, kinds, strict=True):
        encoder = by_architecture[kind]
        config = None if configs is None else configs.get(encoder.name)
        encoders[encoder.name] = build_text_encoder(
            kind, standalone_encoder_state(state_dict, kind), dtype=dtype, device=device,
            config=config)
    return TextEncoderStack(family, encoders, bpe, find_embedding=find_embedding)


def family_for_architectures(architectures: list[str]) -> str:
    key = tuple(sorted(architectures))
    if key not in _FAMILY_BY_ARCHITECTURES:
        known = ", ".join(" + ".join(k) for k in _FAMILY_BY_ARCHITECTURES)
        raise ValueError(f"no Stable Diffusion family uses the text encoders {list(key)}; "
                         f"supported sets: {known}")
    return _FAMILY_BY_ARCHITECTURES[key]


def detect_text_encoder_family(state_dict: Mapping[str, Tensor]) -> str | None:
    """The family whose text-encoder prefixes a checkpoint uses, or None (a cross-check)."""
    found = [family for (family, name), prefixes in CHECKPOINT_PREFIXES.items()
             if any(key.startswith(prefixes) for key in state_dict)]
    if "sdxl" in found:
        return "sdxl"
    return found[0] if found else None


def detect_text_encoder_architecture(state_dict: Mapping[str, Tensor]) -> str:
    """"clip_l", "vit_h" or "vit_bigg" for a bare text-encoder file, from its width."""
    keys = _without_text_model(state_dict)
    token = keys.get("token_embedding.weight", keys.get("embeddings.token_embedding.weight"))
    if token is None:
        raise ValueError("not a CLIP text encoder: no 'text_model.embeddings.token_embedding."
                         "weight' or 'token_embedding.weight' key; pick a CLIP-L/-G/-H file")
    width = token.shape[1]
    if width not in _ARCHITECTURE_BY_WIDTH:
        raise ValueError(f"text encoder width {width} is none of CLIP-L 768, ViT-H 1024, "
                         "bigG 1280; this loader handles only Stable Diffusion 1/2/XL encoders")
    return _ARCHITECTURE_BY_WIDTH[width]


def _checkpoint_encoder_state(family: str, encoder: EncoderSpec,
                              state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    prefixes = CHECKPOINT_PREFIXES[(family, encoder.name)]
    for prefix in prefixes:
        # keys first: a lazily mapped file only opens the tensors that are used
        found = {key[len(prefix):]: state_dict[key] for key in state_dict
                 if key.startswith(prefix)}
        if found:
            return found
    if len(family_spec(family).encoders) == 1:
        return standalone_encoder_state(state_dict, encoder.architecture)
    raise ValueError(f"no {encoder.architecture} weights under {list(prefixes)}; is this an "
                     f"{family} checkpoint? (detected: {detect_text_encoder_family(state_dict)})")


def _without_text_model(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    prefix = "text_model."
    return {key.removeprefix(prefix): value for key, value in state_dict.items()}


def standalone_encoder_state(state_dict: Mapping[str, Tensor], architecture: str
                             ) -> dict[str, Tensor]:
    """A bare text-encoder state dict in this module's naming for `architecture`."""
    keys = _without_text_model(state_dict)
    if architecture == "clip_l" or "token_embedding.weight" in keys:
        return keys
    if "embeddings.token_embedding.weight" in keys:
        return hf_to_openclip_state(keys)
    raise ValueError(f"cannot read this file as {architecture}: it has neither HF nor OpenCLIP "
                     "text-encoder keys")


def hf_to_openclip_state(hf: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF CLIPTextModelWithProjection keys (no `text_model.`) -> OpenCLIP keys.

    q/k/v projections are stacked into in_proj (q, k, v order); text_projection.weight
    [proj, width] is transposed into text_projection [width, proj].
    """
    out: dict[str, Tensor] = {}
    for key, value in hf.items():
        name = _openclip_name(key)
        if name is not None:
            out[name] = value.t().contiguous() if name == "text_projection" else value
    layer_indices = {key.split(".")[2] for key in hf if key.startswith("encoder.layers.")}
    for index in sorted(layer_indices, key=int):
        for leaf in ("weight", "bias"):
            names = [f"encoder.layers.{index}.self_attn.{p}_proj.{leaf}" for p in "qkv"]
            missing = [name for name in names if name not in hf]
            if missing:
                raise ValueError(f"HF text encoder weights lack {missing}; the file is incomplete")
            out[f"transformer.resblocks.{index}.attn.in_proj_{leaf}"] = torch.cat(
                [hf[name] for name in names], dim=0)
    return out


def _openclip_name(hf_key: str) -> str | None:
    """OpenCLIP name of one HF key; None for q/k/v (stacked separately)."""
    if hf_key in _HF_TO_OPENCLIP_TOP:
        return _HF_TO_OPENCLIP_TOP[hf_key]
    if not hf_key.startswith("encoder.layers."):
        return hf_key  # unknown keys are reported by build_text_encoder
    index, name = hf_key.removeprefix("encoder.layers.").split(".", 1)
    module, leaf = name.rsplit(".", 1)
    if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return None
    return f"transformer.resblocks.{index}.{_HF_TO_OPENCLIP_LAYER.get(module, module)}.{leaf}"

def build_text_encoder(architecture: str, weights: Mapping[str, Tensor], *,
                       dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                       config: TextEncoderConfig | None = None) -> nn.Module:
    """An encoder module with `weights` (this module's naming) loaded, in eval mode."""
    config = config or infer_text_encoder_config(architecture, weights)
    model_class = ClipTextModel if architecture == "clip_l" else OpenClipTextModel
    with torch.device("meta"):
        model = model_class(config)
    state = _prepared_state(model, weights, architecture, dtype, torch.device(device))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def infer_text_encoder_config(architecture: str, weights: Mapping[str, Tensor]
                              ) -> TextEncoderConfig:
    """Shapes read from the weights; heads = width / 64 and the activation by architecture."""
    if architecture not in _ACTIVATIONS:
        raise ValueError(f"unknown text encoder {architecture!r}; use one of {list(_ACTIVATIONS)}")
    hf_names = architecture == "clip_l"
    token = _required(weights, "embeddings.token_embedding.weight" if hf_names
                      else "token_embedding.weight", architecture)
    positions = _required(weights, "embeddings.position_embedding.weight" if hf_names
                          else "positional_embedding", architecture)
    block = "encoder.layers." if hf_names else "transformer.resblocks."
    layers = len({key[len(block):].split(".")[0] for key in weights if key.startswith(block)})
    mlp = _required(weights, f"{block}0.mlp.fc1.weight" if hf_names
                    else f"{block}0.mlp.c_fc.weight", architecture)
    projection = None if hf_names else _required(weights, "text_projection", architecture)
    width = token.shape[1]
    if width % _HEAD_WIDTH:
        raise ValueError(f"{architecture} width {width} is not a multiple of the 64-wide heads "
                         "of the released encoders; pass an explicit TextEncoderConfig")
    return TextEncoderConfig(
        width=width, layers=layers, heads=width // _HEAD_WIDTH, mlp_width=mlp.shape[0],
        activation=_ACTIVATIONS[architecture], vocab_size=token.shape[0],
        context_length=positions.shape[0],
        projection_dim=None if projection is None else projection.shape[1])


def _required(weights: Mapping[str, Tensor], key: str, architecture: str) -> Tensor:
    if key not in weights:
        raise ValueError(f"the {architecture} text encoder weights have no {key!r}; the file "
                         "is incomplete or not this kind of encoder")
    return weights[key]


def _prepared_state(model: nn.Module, weights: Mapping[str, Tensor], architecture: str,
                    dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """Weights checked against the module's keys and shapes, cast to dtype on device."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in weights and key != "logit_scale"]
    if missing:
        raise ValueError(f"{architecture} text encoder: {len(missing)} weights missing, e.g. "
                         f"{missing[:4]}; the file is incomplete or of another encoder")
    extra = [key for key in weights if key not in expected and not key.endswith("position_ids")]
    if extra:
        logger.warning("%s text encoder: ignoring %d unexpected weights, e.g. %s",
                       architecture, len(extra), extra[:4])
    state = {}
    for key, template in expected.items():
        value = weights.get(key, torch.tensor(INITIAL_LOGIT_SCALE))
        if value.shape != template.shape:
            raise ValueError(f"{architecture} text encoder: {key!r} has shape "
                             f"{tuple(value.shape)}, expected {tuple(template.shape)}")
        state[key] = value.to(device=device, dtype=dtype)
    return state
