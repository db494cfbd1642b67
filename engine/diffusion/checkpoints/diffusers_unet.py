"""diffusers UNet2DConditionModel <-> Loom's (LDM-named) UNet: the architecture from a diffusers
`unet/config.json`, and the weights renamed block by block in both directions (the block
table is the LoRA one, patches/lora_keys.unet_blocks; inside resnets `norm1, conv1,
time_emb_proj, norm2, conv2, conv_shortcut` are `in_layers.0, in_layers.2, emb_layers.1,
out_layers.0, out_layers.3, skip_connection`).

Config facts (diffusers): `block_out_channels` = model_channels x channel_mult;
`layers_per_block` = num_res_blocks; a level has attention when its down block type is
`CrossAttnDownBlock2D`, with `transformer_layers_per_block[level]` blocks (an int: every
level), the middle block the last level's count; `attention_head_dim` is the head COUNT per
level (a diffusers misnomer; `num_attention_heads` when set): equal counts are SD1's fixed
heads, else the head width is fixed (SD2/SDXL: 64); SDXL's `addition_embed_type` "text_time"
with `projection_class_embeddings_input_dim` is the ADM width."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from engine.diffusion.checkpoints.state_files import CheckpointError
from engine.diffusion.networks.unet import ADM_NUMBER_DIM, UNetConfig
from engine.diffusion.patches.lora_keys import unet_blocks

LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
DIFFUSERS_RESNET = {ldm: diffusers for diffusers, ldm in LDM_RESNET.items()}


def _per_level(value: Any, levels: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)] * levels


def unet_config_from_diffusers(config: Mapping[str, Any], source: str) -> UNetConfig:
    """Loom's UNetConfig for a diffusers UNet2DConditionModel config (module docstring)."""
    unsupported = [key for key in ("class_embed_type", "encoder_hid_dim_type")
                   if config.get(key)]
    if unsupported or config.get("addition_embed_type") not in (None, "text_time"):
        raise CheckpointError(
            f"{source}: this diffusers UNet uses {unsupported or config['addition_embed_type']}"
            ", which no SD1/SD2/SDXL model Loom runs has; use a Stable Diffusion 1.x/2.x/XL "
            "diffusers folder")
    widths = [int(width) for width in config["block_out_channels"]]
    levels = len(widths)
    cross = [kind.startswith("CrossAttn") for kind in config["down_block_types"]]
    depths = _per_level(config.get("transformer_layers_per_block", 1), levels)
    heads = _per_level(config.get("num_attention_heads") or config["attention_head_dim"],
                       levels)
    attended = [level for level in range(levels) if cross[level]] or [levels - 1]
    head_rule = ({"num_heads": heads[0]} if len(set(heads)) == 1 else
                 {"num_head_channels": widths[attended[0]] // heads[attended[0]]})
    adm = (int(config["projection_class_embeddings_input_dim"])
           if config.get("addition_embed_type") == "text_time" else None)
    return UNetConfig(
        in_channels=int(config.get("in_channels", 4)),
        out_channels=int(config.get("out_channels", 4)), model_channels=widths[0],
        channel_mult=tuple(width // widths[0] for width in widths),
        num_res_blocks=int(config.get("layers_per_block", 2)),
        transformer_depth=tuple(depth if attention else 0
                                for depth, attention in zip(depths, cross, strict=True)),
        transformer_depth_middle=depths[-1], context_dim=int(config["cross_attention_dim"]),
        use_linear_in_transformer=bool(config.get("use_linear_projection", False)),
        adm_in_channels=adm, **head_rule)


def diffusers_unet_config(config: UNetConfig) -> dict[str, Any]:
    """The diffusers config.json of a UNet (the inverse of unet_config_from_diffusers)."""
    widths = [config.model_channels * mult for mult in config.channel_mult]
    depths = [depth or config.transformer_depth_middle for depth in config.transformer_depth]
    heads: int | list[int] = (config.num_heads if config.num_heads is not None else
                              [width // (config.num_head_channels or 1) for width in widths])
    out: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel", "in_channels": config.in_channels,
        "out_channels": config.out_channels, "block_out_channels": widths,
        "layers_per_block": config.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if depth else "DownBlock2D"
                             for depth in config.transformer_depth],
        "up_block_types": ["CrossAttnUpBlock2D" if depth else "UpBlock2D"
                           for depth in reversed(config.transformer_depth)],
        "mid_block_type": "UNetMidBlock2DCrossAttn", "transformer_layers_per_block": depths,
        "attention_head_dim": heads, "cross_attention_dim": config.context_dim,
        "use_linear_projection": config.use_linear_in_transformer}
    if config.adm_in_channels is not None:
        out.update(addition_embed_type="text_time", addition_time_embed_dim=ADM_NUMBER_DIM,
                   projection_class_embeddings_input_dim=config.adm_in_channels)
    return out


def _rename(tensors: Mapping[str, Tensor], blocks: Mapping[str, tuple[str, bool]],
            parts: Mapping[str, str], source: str) -> dict[str, Tensor]:
    """Each key's longest block prefix found in `blocks` -> (new block, is a resnet)."""
    renamed, unknown = {}, []
    for key, value in tensors.items():
        names = key.split(".")
        for size in range(min(len(names) - 1, 6), 0, -1):
            block = ".".join(names[:size])
            if block in blocks:
                target, resnet = blocks[block]
                module, leaf = names[size:-1], names[-1]
                inner = ".".join(module)
                if resnet and inner in parts:
                    inner = parts[inner]
                renamed[".".join(filter(None, (target, inner, leaf)))] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} UNet weights fit no block of the "
                              f"configured architecture (e.g. {unknown[:3]}); the config.json "
                              "does not describe these weights")
    return renamed


def diffusers_unet_to_ldm(tensors: Mapping[str, Tensor], config: UNetConfig, source: str
                          ) -> dict[str, Tensor]:
    """diffusers UNet weights -> Loom's LDM names (no copies)."""
    blocks = {diffusers: (ldm, resnet) for ldm, diffusers, resnet in unet_blocks(config)}
    return _rename(tensors, blocks, LDM_RESNET, source)


def ldm_unet_to_diffusers(tensors: Mapping[str, Tensor], config: UNetConfig, source: str
                          ) -> dict[str, Tensor]:
    """Loom's LDM-named UNet weights -> diffusers names (the writer's diffusers folders)."""
    blocks = {ldm: (diffusers, resnet) for ldm, diffusers, resnet in unet_blocks(config)}
    return _rename(tensors, blocks, DIFFUSERS_RESNET, source)
