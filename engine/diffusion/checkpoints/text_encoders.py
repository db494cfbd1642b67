"""Text encoders read from model files: a checkpoint's text side (under its family's key
prefixes) or separate CLIP-L / ViT-H / bigG files in HF or OpenCLIP naming, converted to the
naming of networks/clip_text.py and networks/openclip_text.py and built into the CLIP value
(text.encoding.TextEncoderStack, whose encoding rules are the other half of this)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch import Tensor, nn

from engine.diffusion.checkpoints.safetensors_io import CastOnRead
from engine.diffusion.memory.cast_on_use import Holding
from engine.diffusion.networks.clip_text import ClipTextModel, TextEncoderConfig
from engine.diffusion.networks.openclip_text import INITIAL_LOGIT_SCALE, OpenClipTextModel
from engine.diffusion.text.encoding import EncoderSpec, TextEncoderStack, family_spec
from engine.diffusion.text.prompt_weights import EmbeddingFinder
from engine.diffusion.text.tokenizer import ClipBpe

logger = logging.getLogger("loom.clip")
FP32 = Holding(torch.float32)  # held and computed in fp32 (the default of the loaders here)

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
                            holding: Holding = FP32, device: str | torch.device = "cpu",
                            configs: Mapping[str, TextEncoderConfig] | None = None
                            ) -> TextEncoderStack:
    """The text side of a checkpoint (full state dict, prefixes as stored) as a CLIP handle.

    A one-encoder family also accepts a bare text-encoder state dict. `configs` (by encoder
    name) overrides the shapes read from the weights (tiny test models); `holding` says in
    which dtype the weights are held and computed (memory/cast_on_use.py).
    """
    spec = family_spec(family)
    # only the text encoders' tensors are read, straight into the dtype they are held in
    reader = CastOnRead(state_dict, {"": holding})
    encoders = {}
    for encoder in spec.encoders:
        weights = _checkpoint_encoder_state(family, encoder, reader)
        config = None if configs is None else configs.get(encoder.name)
        encoders[encoder.name] = build_text_encoder(encoder.architecture, weights,
                                                    holding=holding, device=device,
                                                    config=config)
    return TextEncoderStack(family, encoders, bpe, find_embedding=find_embedding)


def load_text_encoder_files(state_dicts: list[Mapping[str, Tensor]], bpe: ClipBpe, *,
                            find_embedding: EmbeddingFinder | None = None,
                            holding: Holding = FP32, device: str | torch.device = "cpu",
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
        weights = standalone_encoder_state(CastOnRead(state_dict, {"": holding}), kind)
        encoders[encoder.name] = build_text_encoder(kind, weights, holding=holding,
                                                    device=device, config=config)
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


def hf_text_encoder_state(encoder: nn.Module) -> dict[str, Tensor]:
    """An encoder's weights in HF CLIPTextModel(WithProjection) naming: `text_model.*` (and
    `text_projection.weight`); OpenCLIP towers are converted (in_proj split into q/k/v,
    text_projection transposed), the inverse of hf_to_openclip_state."""
    state = encoder.state_dict()
    if isinstance(encoder, ClipTextModel):
        return {f"text_model.{key}": value for key, value in state.items()}
    top = {openclip: hf for hf, openclip in _HF_TO_OPENCLIP_TOP.items()}
    layer = {openclip: hf for hf, openclip in _HF_TO_OPENCLIP_LAYER.items()}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key in top:
            out[f"text_model.{top[key]}"] = value
        elif key.startswith("transformer.resblocks."):
            out.update(_hf_layer_entries(key, value, layer))
    return out


def _hf_layer_entries(key: str, value: Tensor, layer: Mapping[str, str]) -> dict[str, Tensor]:
    index, name = key.removeprefix("transformer.resblocks.").split(".", 1)
    module, leaf = name.rsplit(".", 1)
    base = f"text_model.encoder.layers.{index}"
    if module == "attn" and leaf.startswith("in_proj_"):
        kind = leaf.removeprefix("in_proj_")
        return {f"{base}.self_attn.{part}_proj.{kind}": chunk
                for part, chunk in zip("qkv", value.chunk(3, dim=0), strict=True)}
    return {f"{base}.{layer.get(module, module)}.{leaf}": value}


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
                       holding: Holding = FP32, device: str | torch.device = "cpu",
                       config: TextEncoderConfig | None = None) -> nn.Module:
    """An encoder module with `weights` (this module's naming) loaded, in eval mode, computing
    in the holding's compute dtype, each weight held as `holding` says (cast up per layer)."""
    config = config or infer_text_encoder_config(architecture, weights)
    model_class = ClipTextModel if architecture == "clip_l" else OpenClipTextModel
    with torch.device("meta"):
        model = model_class(config)
    state = _prepared_state(model, weights, architecture, holding, torch.device(device))
    model.load_state_dict(state, strict=True, assign=True)
    holding.apply(model)
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
                    holding: Holding, device: torch.device) -> dict[str, Tensor]:
    """Weights checked against the module's keys and shapes, in their held dtype on device."""
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
        state[key] = holding.held(value).to(device)
    return state
