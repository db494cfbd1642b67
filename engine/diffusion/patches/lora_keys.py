"""Which parameter of our networks a LoRA module name means.

LoRA files name modules in diffusers/HuggingFace paths (kohya: with '.' -> '_' and a
`lora_unet_` / `lora_te_` / `lora_te1_` / `lora_te2_` prefix; diffusers/PEFT: `unet.` /
`text_encoder.` / `text_encoder_2.` prefixes) or, for SDXL kohya files and ComfyUI-made files,
in LDM checkpoint paths (ComfyUI's: `diffusion_model.` and, for text encoders,
`text_encoders.clip_<l|h|g>.transformer.` + the HF path). Underscored names cannot be split
back into paths, so the table is built forward: list our modules, derive every spelling a file
may use, and look names up (shared/formats/README.md, "kohya / A1111 LoRA")."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

from engine.diffusion.networks.clip_text import ClipTextModel
from engine.diffusion.networks.openclip_text import OpenClipTextModel
from engine.diffusion.networks.unet import UNet, UNetConfig

UNET = "unet"


@dataclass(frozen=True)
class Target:
    """The parameters one adapted module changes: a weight (and its bias) of `component`
    ("unet" or a text encoder's name "l"/"h"/"g"), optionally only rows [start, stop) of it
    (OpenCLIP stacks q, k and v in one in_proj_weight), or its transpose (OpenCLIP's
    text_projection [width, proj] is HF's Linear weight [proj, width])."""

    component: str
    weight: str
    bias: str | None = None
    rows: tuple[int, int] | None = None
    transposed: bool = False


# diffusers resnet layer names -> LDM ResBlock slots
_RESNET_LAYERS = MappingProxyType({
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"})
_UNET_TOP = (("time_embed.0", "time_embedding.linear_1"),
             ("time_embed.2", "time_embedding.linear_2"),
             ("label_emb.0.0", "add_embedding.linear_1"),
             ("label_emb.0.2", "add_embedding.linear_2"),
             ("label_emb", "class_embedding"),  # the x4 upscaler's class-label table
             ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"))
# OpenCLIP layer names -> HF CLIPTextModel names inside encoder.layers.{i}
_OPENCLIP_LAYER = MappingProxyType({
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"})
_OPENCLIP_TOP = MappingProxyType({
    "token_embedding": "embeddings.token_embedding", "ln_final": "final_layer_norm"})


def unet_blocks(config: UNetConfig) -> list[tuple[str, str, bool]]:
    """(LDM block path, diffusers block path, is a resnet) for every block of a UNet layout."""
    blocks = [(ldm, diffusers, False) for ldm, diffusers in _UNET_TOP]
    per_level = config.num_res_blocks + 1
    levels = len(config.channel_mult)
    for level in range(levels):
        for index in range(config.num_res_blocks):
            ldm = f"input_blocks.{1 + level * per_level + index}"
            blocks.append((f"{ldm}.0", f"down_blocks.{level}.resnets.{index}", True))
            if config.transformer_depth[level]:
                blocks.append((f"{ldm}.1", f"down_blocks.{level}.attentions.{index}", False))
        if level < levels - 1:
            blocks.append((f"input_blocks.{(level + 1) * per_level}.0.op",
                           f"down_blocks.{level}.downsamplers.0.conv", False))
    blocks.append(("middle_block.0", "mid_block.resnets.0", True))
    if config.transformer_depth_middle:
        blocks.append(("middle_block.1", "mid_block.attentions.0", False))
    blocks.append((f"middle_block.{2 if config.transformer_depth_middle else 1}",
                   "mid_block.resnets.1", True))
    for up in range(levels):
        level = levels - 1 - up
        for index in range(per_level):
            ldm = f"output_blocks.{up * per_level + index}"
            blocks.append((f"{ldm}.0", f"up_blocks.{up}.resnets.{index}", True))
            if config.transformer_depth[level]:
                blocks.append((f"{ldm}.1", f"up_blocks.{up}.attentions.{index}", False))
        if level > 0:
            slot = 2 if config.transformer_depth[level] else 1
            blocks.append((f"output_blocks.{up * per_level + per_level - 1}.{slot}.conv",
                           f"up_blocks.{up}.upsamplers.0.conv", False))
    return blocks


def _weighted_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Sub-modules that own a `weight` parameter (Linear, Conv, norms, embeddings)."""
    for name, child in module.named_modules():
        if isinstance(getattr(child, "weight", None), nn.Parameter):
            yield name, child


def _target(component: str, name: str, module: nn.Module) -> Target:
    bias = f"{name}.bias" if isinstance(getattr(module, "bias", None), nn.Parameter) else None
    return Target(component, f"{name}.weight", bias)


def unet_paths(unet: nn.Module, config: UNetConfig) -> dict[str, tuple[str, Target]]:
    """LDM module path -> (diffusers module path, target) for every weighted UNet module."""
    blocks = {ldm: (diffusers, resnet) for ldm, diffusers, resnet in unet_blocks(config)}
    table = {}
    for name, module in _weighted_modules(unet):
        parts = name.split(".")
        for size in (4, 3, 2):
            block = ".".join(parts[:size])
            if block in blocks:
                break
        else:
            raise ValueError(f"UNet module {name!r} lies in no known block; the diffusers name "
                             "table does not cover this layout")
        diffusers, resnet = blocks[block]
        rest = ".".join(parts[size:])
        if resnet and rest:
            rest = _RESNET_LAYERS.get(rest, rest)
        table[name] = (f"{diffusers}.{rest}" if rest else diffusers, _target(UNET, name, module))
    return table


def clip_l_paths(encoder: ClipTextModel, component: str) -> dict[str, Target]:
    """HF path (from `text_model.`) -> target, for CLIP-L (our names are HF's minus the root)."""
    return {f"text_model.{name}": _target(component, name, module)
            for name, module in _weighted_modules(encoder)}


def openclip_paths(encoder: OpenClipTextModel, component: str) -> dict[str, Target]:
    """HF path -> target for an OpenCLIP tower; q/k/v map to row slices of in_proj."""
    width = encoder.config.width
    table = {"text_model.embeddings.position_embedding": Target(component,
                                                                "positional_embedding")}
    for name, module in _weighted_modules(encoder):
        if name in _OPENCLIP_TOP:
            table[f"text_model.{_OPENCLIP_TOP[name]}"] = _target(component, name, module)
            continue
        _, _, index, layer = name.split(".", 3)  # transformer.resblocks.{i}.{layer}
        table[f"text_model.encoder.layers.{index}.{_OPENCLIP_LAYER[layer]}"] = _target(
            component, name, module)
    for index in range(encoder.config.layers):
        attention = f"transformer.resblocks.{index}.attn"
        for slot, projection in enumerate("qkv"):
            rows = (slot * width, (slot + 1) * width)
            table[f"text_model.encoder.layers.{index}.self_attn.{projection}_proj"] = Target(
                component, f"{attention}.in_proj_weight", f"{attention}.in_proj_bias", rows)
    table["text_projection"] = Target(component, "text_projection", transposed=True)
    return table


def text_paths(encoder: nn.Module, component: str) -> dict[str, Target]:
    if isinstance(encoder, ClipTextModel):
        return clip_l_paths(encoder, component)
    if isinstance(encoder, OpenClipTextModel):
        return openclip_paths(encoder, component)
    raise TypeError(f"text encoder {component!r} is a {type(encoder).__name__}; LoRA names are "
                    "known for ClipTextModel and OpenClipTextModel only")


def text_prefixes(names: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Encoder name -> the LoRA prefixes (kohya, then diffusers) that address it.

    One-encoder families use lora_te_/text_encoder.; SDXL's CLIP-L is te1/text_encoder. and its
    bigG te2/text_encoder_2. (the refiner's lone bigG answers to both spellings)."""
    if sorted(names) == ["g", "l"]:
        return {"l": ("lora_te1_", "text_encoder."), "g": ("lora_te2_", "text_encoder_2.")}
    if len(names) != 1:
        raise ValueError(f"no LoRA prefixes are known for text encoders {names}")
    prefixes = ("lora_te_", "text_encoder.")
    if names == ("g",):
        prefixes += ("lora_te2_", "text_encoder_2.")
    return {names[0]: prefixes}


def _spellings(prefix: str, path: str) -> str:
    """kohya prefixes (ending in '_') take the underscored path, the others the dotted one."""
    return prefix + path.replace(".", "_") if prefix.endswith("_") else prefix + path


def lora_name_table(unet: UNet | None, encoders: Mapping[str, nn.Module]) -> dict[str, Target]:
    """Every module name a LoRA file may use -> the target it means in our networks.

    `encoders` by name ("l", "h", "g"); pass no unet / no encoders to leave a side out."""
    table: dict[str, Target] = {}
    if unet is not None:
        for ldm, (diffusers, target) in unet_paths(unet, unet.config).items():
            for name in (f"lora_unet_{diffusers.replace('.', '_')}", f"unet.{diffusers}",
                         f"lora_unet_{ldm.replace('.', '_')}", f"diffusion_model.{ldm}",
                         f"model.diffusion_model.{ldm}"):
                _add(table, name, target)
    prefixes = text_prefixes(tuple(encoders)) if encoders else {}
    for component, encoder in encoders.items():
        # ComfyUI's own files (LoraSave) name its CLIP modules: clip_l.transformer.text_model..
        own = f"text_encoders.clip_{component}.transformer."
        for path, target in text_paths(encoder, component).items():
            for prefix in (*prefixes[component], own):
                _add(table, _spellings(prefix, path), target)
    return table


def _add(table: dict[str, Target], name: str, target: Target) -> None:
    if table.setdefault(name, target) != target:
        raise ValueError(f"LoRA name {name!r} would mean both {table[name]} and {target}; the "
                         "name table is ambiguous for this layout")
