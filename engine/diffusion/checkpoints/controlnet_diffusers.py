"""diffusers-layout ControlNet names -> the original (LDM) names our ControlNet module uses.

The block mapping is the UNet's (shared/formats/README.md, LoRA section), applied to the
encoder half, plus the ControlNet parts: with R ResBlocks per level,

| diffusers                                   | original                                |
|---------------------------------------------|-----------------------------------------|
| `time_embedding.linear_{1,2}`               | `time_embed.{0,2}`                      |
| `add_embedding.linear_{1,2}` (SDXL)         | `label_emb.0.{0,2}`                     |
| `conv_in`                                   | `input_blocks.0.0`                      |
| `down_blocks.b.resnets.r`                   | `input_blocks.{b(R+1)+r+1}.0`           |
| `down_blocks.b.attentions.a`                | `input_blocks.{b(R+1)+a+1}.1`           |
| `down_blocks.b.downsamplers.0.conv`         | `input_blocks.{(b+1)(R+1)}.0.op`        |
| `mid_block.resnets.{0,1}`                   | `middle_block.{0,2}` (`{0,1}` if no attention) |
| `mid_block.attentions.0`                    | `middle_block.1`                        |
| `controlnet_cond_embedding.conv_in`         | `input_hint_block.0`                    |
| `controlnet_cond_embedding.blocks.i`        | `input_hint_block.{2i+2}`               |
| `controlnet_cond_embedding.conv_out`        | `input_hint_block.{2n+2}` (n blocks)    |
| `controlnet_down_blocks.i`                  | `zero_convs.i.0`                        |
| `controlnet_mid_block`                      | `middle_block_out.0`                    |

Inside resnets, `norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut` are `in_layers.0,
in_layers.2, emb_layers.1, out_layers.0, out_layers.3, skip_connection`; attention blocks keep
their inner names. ControlNet-Union's own parts (`task_embedding`, `transformer_layes`,
`spatial_ch_projs`, `control_add_embedding`) keep their names (ComfyUI's `.attn.in_proj.`
spelling becomes the files' `.attn.in_proj_`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from torch import Tensor

from engine.diffusion.networks.controlnet import ControlNetLayoutError

DIFFUSERS_PROBE = "controlnet_cond_embedding.conv_in.weight"
UNION_PARTS = ("task_embedding", "transformer_layes.", "spatial_ch_projs.",
               "control_add_embedding.")
RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3",
                "conv_shortcut": "skip_connection"}
Renamer = Callable[[re.Match[str]], str]


def _count(keys: list[str], pattern: str) -> int:
    compiled = re.compile(pattern)
    return len({match.group(1) for key in keys if (match := compiled.match(key))})


def _rules(keys: list[str]) -> list[tuple[re.Pattern[str], Renamer]]:
    """(pattern, new name) pairs for this file's block counts."""
    per_level = _count(keys, r"down_blocks\.0\.resnets\.(\d+)\.") + 1
    mid_step = 2 if any(key.startswith("mid_block.attentions.") for key in keys) else 1
    hint_out = 2 * _count(keys, r"controlnet_cond_embedding\.blocks\.(\d+)\.") + 2

    def resnet(match: re.Match[str]) -> str:
        block, index = int(match.group(1)), int(match.group(2))
        return (f"input_blocks.{block * per_level + index + 1}.0."
                f"{RESNET_NAMES[match.group(3)]}.{match.group(4)}")

    def mid_resnet(match: re.Match[str]) -> str:
        return (f"middle_block.{int(match.group(1)) * mid_step}."
                f"{RESNET_NAMES[match.group(2)]}.{match.group(3)}")

    table: list[tuple[str, Renamer]] = [
        (r"time_embedding\.linear_([12])\.(.*)",
         lambda m: f"time_embed.{2 * int(m.group(1)) - 2}.{m.group(2)}"),
        (r"add_embedding\.linear_([12])\.(.*)",
         lambda m: f"label_emb.0.{2 * int(m.group(1)) - 2}.{m.group(2)}"),
        (r"conv_in\.(.*)", lambda m: f"input_blocks.0.0.{m.group(1)}"),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.*)", resnet),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)",
         lambda m: f"input_blocks.{int(m.group(1)) * per_level + int(m.group(2)) + 1}.1."
                   f"{m.group(3)}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)",
         lambda m: f"input_blocks.{(int(m.group(1)) + 1) * per_level}.0.op.{m.group(2)}"),
        (r"mid_block\.resnets\.(\d+)\.(\w+)\.(.*)", mid_resnet),
        (r"mid_block\.attentions\.0\.(.*)", lambda m: f"middle_block.1.{m.group(1)}"),
        (r"controlnet_cond_embedding\.conv_in\.(.*)", lambda m: f"input_hint_block.0.{m.group(1)}"),
        (r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)",
         lambda m: f"input_hint_block.{2 * int(m.group(1)) + 2}.{m.group(2)}"),
        (r"controlnet_cond_embedding\.conv_out\.(.*)",
         lambda m: f"input_hint_block.{hint_out}.{m.group(1)}"),
        (r"controlnet_down_blocks\.(\d+)\.(.*)",
         lambda m: f"zero_convs.{m.group(1)}.0.{m.group(2)}"),
        (r"controlnet_mid_block\.(.*)", lambda m: f"middle_block_out.0.{m.group(1)}"),
    ]
    return [(re.compile(pattern), rename) for pattern, rename in table]


def diffusers_to_original(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The same tensors (no copies) under original-layout names; unknown names are an error."""
    keys = list(tensors)
    rules = _rules(keys)
    renamed: dict[str, Tensor] = {}
    unknown = []
    for key in keys:
        if key.startswith(UNION_PARTS):
            renamed[key.replace(".attn.in_proj.", ".attn.in_proj_")] = tensors[key]
            continue
        for pattern, rename in rules:
            match = pattern.fullmatch(key)
            if match:
                try:
                    renamed[rename(match)] = tensors[key]
                except KeyError:  # a resnet part name outside RESNET_NAMES
                    unknown.append(key)
                break
        else:
            unknown.append(key)
    if unknown:
        raise ControlNetLayoutError(
            f"{len(unknown)} diffusers ControlNet tensor names have no original-layout "
            f"equivalent (e.g. {unknown[:3]}); this is a ControlNet variant Loom does not load "
            "(ControlNet-XS and SD3/Flux ControlNets are not supported)")
    return renamed


def _original_rules(keys: list[str]) -> list[tuple[re.Pattern[str], Renamer]]:
    """The inverse of `_rules`: original-layout names -> diffusers names."""
    blocks = sorted({int(m.group(1)) for key in keys
                     if (m := re.match(r"input_blocks\.(\d+)\.", key))})
    downsamplers = [index for index in blocks if f"input_blocks.{index}.0.op.weight" in keys]
    per_level = downsamplers[0] if downsamplers else len(blocks)
    mid_step = 2 if any(key.startswith("middle_block.2.") for key in keys) else 1
    hints = sorted({int(m.group(1)) for key in keys
                    if (m := re.match(r"input_hint_block\.(\d+)\.", key))})
    resnet_parts = {ldm: diffusers for diffusers, ldm in RESNET_NAMES.items()}
    parts = "|".join(re.escape(part) for part in resnet_parts)

    def hint(match: re.Match[str]) -> str:
        index = int(match.group(1))
        name = ("conv_in" if index == 0 else "conv_out" if index == hints[-1]
                else f"blocks.{index // 2 - 1}")
        return f"controlnet_cond_embedding.{name}.{match.group(2)}"

    def place(index: int) -> tuple[int, int]:
        return (index - 1) // per_level, (index - 1) % per_level

    table: list[tuple[str, Renamer]] = [
        (r"time_embed\.([02])\.(.*)",
         lambda m: f"time_embedding.linear_{int(m.group(1)) // 2 + 1}.{m.group(2)}"),
        (r"label_emb\.0\.([02])\.(.*)",
         lambda m: f"add_embedding.linear_{int(m.group(1)) // 2 + 1}.{m.group(2)}"),
        (r"input_blocks\.0\.0\.(.*)", lambda m: f"conv_in.{m.group(1)}"),
        (r"input_blocks\.(\d+)\.0\.op\.(.*)",
         lambda m: f"down_blocks.{int(m.group(1)) // per_level - 1}.downsamplers.0.conv."
                   f"{m.group(2)}"),
        (rf"input_blocks\.(\d+)\.0\.({parts})\.(.*)",
         lambda m: "down_blocks.{}.resnets.{}.".format(*place(int(m.group(1))))
                   + f"{resnet_parts[m.group(2)]}.{m.group(3)}"),
        (r"input_blocks\.(\d+)\.1\.(.*)",
         lambda m: "down_blocks.{}.attentions.{}.".format(*place(int(m.group(1))))
                   + m.group(2)),
        (rf"middle_block\.(\d+)\.({parts})\.(.*)",
         lambda m: f"mid_block.resnets.{int(m.group(1)) // mid_step}."
                   f"{resnet_parts[m.group(2)]}.{m.group(3)}"),
        (r"middle_block\.1\.(.*)", lambda m: f"mid_block.attentions.0.{m.group(1)}"),
        (r"input_hint_block\.(\d+)\.(.*)", hint),
        (r"zero_convs\.(\d+)\.0\.(.*)",
         lambda m: f"controlnet_down_blocks.{m.group(1)}.{m.group(2)}"),
        (r"middle_block_out\.0\.(.*)", lambda m: f"controlnet_mid_block.{m.group(1)}"),
        (r"(.*)", lambda m: m.group(1)),  # ControlNet-Union parts keep their names
    ]
    return [(re.compile(pattern), rename) for pattern, rename in table]


def original_to_diffusers(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Original-layout ControlNet names (without `control_model.`) -> the diffusers layout, as
    diffusers saves a ControlNetModel / ControlNetUnionModel (the writer's diffusers files)."""
    keys = list(tensors)
    rules = _original_rules(keys)
    renamed = {}
    for key in keys:
        for pattern, rename in rules:
            match = pattern.fullmatch(key)
            if match:
                renamed[rename(match)] = tensors[key]
                break
    return renamed
