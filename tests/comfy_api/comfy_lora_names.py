"""ComfyUI 0.8's LoRA key maps for a checkpoint layout, derived from the recorded tensor names
(tests/data/formats) by ComfyUI's naming rules, written out here independently of Loom's name
tables so the comfy.lora facade is checked against the rules, not against itself.

UNet: every weight "diffusion_model.<m>.weight" answers to "lora_unet_<m with _>" and
"diffusion_model.<m>", every other tensor to its own key; each module with a diffusers name
<d> also to "lora_unet_<d with _>", "lycoris_<d with _>", <d'> and "unet.<d'>", where <d'> is
<d> with ".to_" spelled ".processor.to_" and a final ".to_out.0" cut to ".to_out". Text
encoders: ComfyUI names weights "clip_<l|g>.transformer.<HF CLIPTextModel name>" (bigG
converted from OpenCLIP); each weight answers to "text_encoders.<name>", each layer's
fc1/fc2/q/k/v/out_proj to the kohya and diffusers spellings of its encoder."""

from __future__ import annotations

import re

UNET_ROOT = "model.diffusion_model."
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TRANSFORMER = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v",
               "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
               "ff.net.0.proj", "ff.net.2")
TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
       "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
       "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
       "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2"}
LAYER_MODULES = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj",
                 "self_attn.v_proj", "self_attn.out_proj")
OPENCLIP = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
            "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def _attention(found: dict[str, str], diffusers: str, ldm: str, keys: set[str]) -> None:
    """An attention block's modules, when the layout has one at `ldm`."""
    if f"{ldm}.proj_in.weight" not in keys:
        return
    for part in ("proj_in", "proj_out", "norm"):
        found[f"{diffusers}.{part}"] = f"{ldm}.{part}"
    depth = len({m[1] for key in keys if (m := re.match(rf"{re.escape(ldm)}\.transformer_blocks"
                                                         rf"\.(\d+)\.", key))})
    for block in range(depth):
        for part in TRANSFORMER:
            found[f"{diffusers}.transformer_blocks.{block}.{part}"] = \
                f"{ldm}.transformer_blocks.{block}.{part}"


def _resnet(found: dict[str, str], diffusers: str, ldm: str) -> None:
    for name, slot in RESNET.items():
        found[f"{diffusers}.{name}"] = f"{ldm}.{slot}"


def diffusers_modules(keys: set[str]) -> dict[str, str]:
    """diffusers module name -> LDM module name (2 resnets per level, as SD1.5 and SDXL)."""
    levels = (max(int(k.split(".")[1]) for k in keys if k.startswith("input_blocks.")) - 1) // 3 + 1
    found = dict(TOP)
    for level in range(levels):
        for index in range(2):
            block = f"input_blocks.{1 + 3 * level + index}"
            _resnet(found, f"down_blocks.{level}.resnets.{index}", f"{block}.0")
            _attention(found, f"down_blocks.{level}.attentions.{index}", f"{block}.1", keys)
        found[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{3 + 3 * level}.0.op"
    _attention(found, "mid_block.attentions.0", "middle_block.1", keys)
    _resnet(found, "mid_block.resnets.0", "middle_block.0")
    _resnet(found, "mid_block.resnets.1", "middle_block.2")
    for level in range(levels):
        for index in range(3):
            block = f"output_blocks.{3 * level + index}"
            _resnet(found, f"up_blocks.{level}.resnets.{index}", f"{block}.0")
            _attention(found, f"up_blocks.{level}.attentions.{index}", f"{block}.1", keys)
            slot = 2 if f"{block}.1.proj_in.weight" in keys else 1
            found[f"up_blocks.{level}.upsamplers.0.conv"] = f"{block}.{slot}.conv"
    return found


def expected_unet_map(checkpoint: set[str]) -> dict[str, str]:
    keys = {key.removeprefix(UNET_ROOT) for key in checkpoint if key.startswith(UNET_ROOT)}
    found = {}
    for key in keys:
        if key.endswith(".weight"):
            module = key.removesuffix(".weight")
            found[f"lora_unet_{module.replace('.', '_')}"] = f"diffusion_model.{key}"
            found[f"diffusion_model.{module}"] = f"diffusion_model.{key}"
        else:
            found[f"diffusion_model.{key}"] = f"diffusion_model.{key}"
    for diffusers, ldm in diffusers_modules(keys).items():
        if f"{ldm}.weight" not in keys:
            continue  # ComfyUI also maps names for weights the model lacks
        processor = diffusers.replace(".to_", ".processor.to_")
        processor = processor.removesuffix(".0") if processor.endswith(".to_out.0") else processor
        for name in (f"lora_unet_{diffusers.replace('.', '_')}",
                     f"lycoris_{diffusers.replace('.', '_')}", processor, f"unet.{processor}"):
            found[name] = f"diffusion_model.{ldm}.weight"
    return found


def openclip_as_hf(key: str) -> list[str]:
    """ComfyUI's HF names for one OpenCLIP text-tower tensor name (no prefix)."""
    fixed = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
             "positional_embedding": "text_model.embeddings.position_embedding.weight",
             "ln_final.weight": "text_model.final_layer_norm.weight",
             "ln_final.bias": "text_model.final_layer_norm.bias",
             "text_projection": "text_projection.weight", "logit_scale": ""}
    if key in fixed:
        return [fixed[key]] if fixed[key] else []
    index, rest = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", key).groups()
    layer = f"text_model.encoder.layers.{index}"
    if rest.startswith("attn.in_proj_"):
        kind = "weight" if rest.endswith("weight") else "bias"
        return [f"{layer}.self_attn.{p}_proj.{kind}" for p in "qkv"]
    module, _, kind = rest.rpartition(".")
    return [f"{layer}.{OPENCLIP[module]}.{kind}"]


def comfy_clip_names(checkpoint: set[str], roots: dict[str, str]) -> dict[str, list[str]]:
    """Encoder -> ComfyUI's weight names, from each encoder's checkpoint prefix (HF layout when
    the prefix ends in "transformer.", OpenCLIP otherwise)."""
    found: dict[str, list[str]] = {}
    for encoder, root in roots.items():
        names = found.setdefault(encoder, [])
        for key in sorted(k.removeprefix(root) for k in checkpoint if k.startswith(root)):
            hf = [key] if root.endswith("transformer.") else openclip_as_hf(key)
            names += [f"clip_{encoder}.transformer.{name}" for name in hf
                      if not name.endswith("position_ids")]
    return found


def expected_clip_map(checkpoint: set[str], roots: dict[str, str]) -> dict[str, str]:
    names = comfy_clip_names(checkpoint, roots)
    found = {}
    for encoder_names in names.values():
        for name in encoder_names:
            if name.endswith(".weight"):
                found[f"text_encoders.{name.removesuffix('.weight')}"] = name
    spellings = {"l": [("lora_te_", "text_encoder."), ("lora_te1_", None)],
                 "g": [("lora_te2_", "text_encoder_2.")] if "l" in names else
                      [("lora_te_", "text_encoder."), ("lora_prior_te_", None)]}
    for encoder, encoder_names in names.items():
        for name in encoder_names:
            match = re.match(rf"clip_{encoder}\.transformer\.text_model\.encoder\.layers\.(\d+)\."
                             r"(.+)\.weight$", name)
            if not match or match[2] not in LAYER_MODULES:
                continue
            for kohya, diffusers in spellings[encoder]:
                index, module = match.groups()
                found[f"{kohya}text_model_encoder_layers_{index}_{module.replace('.', '_')}"] = name
                if diffusers:
                    found[f"{diffusers}text_model.encoder.layers.{index}.{module}"] = name
    if "g" in names:
        found["lora_prior_te_text_projection"] = "clip_g.transformer.text_projection.weight"
        found["lora_te2_text_projection"] = "clip_g.transformer.text_projection.weight"
    return found
