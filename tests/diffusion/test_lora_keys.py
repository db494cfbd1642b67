"""The LoRA name table, checked against full-size networks built on the meta device (no memory):
every module of the reference SD1.5 kohya LoRA (tests/data/formats/lora_sd15_kohya.tsv) matches a
weight of the right shape, and our diffusers/HF names are exactly the module names of diffusers'
UNet2DConditionModel and transformers' CLIP text models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.diffusion.networks.clip_text import CLIP_L_CONFIG, ClipTextModel
from engine.diffusion.networks.openclip_text import VIT_BIGG_CONFIG, VIT_H_CONFIG, OpenClipTextModel
from engine.diffusion.networks.unet import UNet, UNetConfig, UNetFamily
from engine.diffusion.patches.lora import lora_patches, parse_lora
from engine.diffusion.patches.lora_keys import Target, lora_name_table, openclip_paths, unet_paths
from tests.diffusion.manifests import manifest, meta_state


def meta_unet(family: UNetFamily) -> UNet:
    with torch.device("meta"):
        return UNet(UNetConfig.preset(family))


def weighted_names(module: nn.Module) -> set[str]:
    return {name for name, child in module.named_modules()
            if isinstance(getattr(child, "weight", None), nn.Parameter)}


@pytest.fixture(scope="module")
def sd15_table() -> dict[str, Target]:
    with torch.device("meta"):
        clip = ClipTextModel(CLIP_L_CONFIG)
    return lora_name_table(meta_unet(UNetFamily.SD1), {"l": clip})


def test_every_module_of_the_reference_kohya_lora_has_a_target(sd15_table) -> None:
    modules = {key.split(".")[0] for key in manifest("lora_sd15_kohya")}
    assert len(modules) == 264
    missing = sorted(modules - set(sd15_table))
    assert not missing, missing[:5]


def test_the_reference_kohya_lora_fits_full_size_sd15_shapes() -> None:
    with torch.device("meta"):
        clip = ClipTextModel(CLIP_L_CONFIG)
    lora = parse_lora(meta_state("lora_sd15_kohya"), "lora_sd15_kohya")
    result = lora_patches(lora, unet=meta_unet(UNetFamily.SD1), encoders={"l": clip})
    assert (result.report.matched, result.report.unmatched) == (792, 0)
    assert len(result.unet.deltas) == 192 and len(result.text["l"].deltas) == 72


@pytest.mark.parametrize(("name", "component", "weight"), [
    ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0", "unet",
     "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.weight"),
    ("lora_unet_down_blocks_2_attentions_1_proj_in", "unet", "input_blocks.8.1.proj_in.weight"),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj", "unet",
     "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight"),
    ("lora_unet_up_blocks_1_upsamplers_0_conv", "unet", "output_blocks.5.2.conv.weight"),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "unet", "output_blocks.2.1.conv.weight"),
    ("lora_unet_down_blocks_1_downsamplers_0_conv", "unet", "input_blocks.6.0.op.weight"),
    ("lora_unet_up_blocks_2_resnets_1_conv_shortcut", "unet",
     "output_blocks.7.0.skip_connection.weight"),
    ("lora_unet_mid_block_resnets_1_time_emb_proj", "unet", "middle_block.2.emb_layers.1.weight"),
    ("lora_te_text_model_encoder_layers_11_mlp_fc2", "l", "encoder.layers.11.mlp.fc2.weight"),
])
def test_kohya_names_reach_the_readme_ldm_paths(sd15_table, name: str, component: str,
                                                weight: str) -> None:
    target = sd15_table[name]
    assert (target.component, target.weight) == (component, weight)


def diffusers_sd15() -> nn.Module:
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        return diffusers.UNet2DConditionModel(cross_attention_dim=768)


def diffusers_sdxl() -> nn.Module:
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        return diffusers.UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, use_linear_projection=True)


@pytest.mark.parametrize(("family", "reference"), [(UNetFamily.SD1, diffusers_sd15),
                                                   (UNetFamily.SDXL, diffusers_sdxl)])
def test_our_diffusers_unet_names_are_diffusers_module_names(family, reference) -> None:
    unet = meta_unet(family)
    ours = {diffusers: target.weight
            for diffusers, target in unet_paths(unet, unet.config).values()}
    theirs = reference()
    assert set(ours) == weighted_names(theirs)
    mismatched = [name for name, weight in ours.items()
                  if tuple(theirs.get_submodule(name).weight.shape)
                  != tuple(unet.get_parameter(weight).shape)]
    assert not mismatched, mismatched[:5]


@pytest.mark.parametrize("config", [VIT_H_CONFIG, VIT_BIGG_CONFIG])
def test_openclip_hf_names_cover_a_transformers_clip_text_model(config) -> None:
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.CLIPTextConfig(
        hidden_size=config.width, intermediate_size=config.mlp_width,
        num_attention_heads=config.heads, num_hidden_layers=config.layers,
        projection_dim=config.projection_dim, hidden_act="gelu")
    with torch.device("meta"):
        reference = transformers.CLIPTextModelWithProjection(hf_config)
        ours = OpenClipTextModel(config)
    table = openclip_paths(ours, "g")
    assert set(table) == weighted_names(reference)  # text_projection included (transposed)
    for name, target in table.items():
        region = ours.get_parameter(target.weight).shape
        if target.transposed:
            region = region[::-1]
        if target.rows is not None:
            region = (target.rows[1] - target.rows[0], *region[1:])
        assert tuple(region) == tuple(reference.get_submodule(name).weight.shape), name


def test_sdxl_table_has_both_spellings_and_both_text_encoders() -> None:
    with torch.device("meta"):
        encoders = {"l": ClipTextModel(CLIP_L_CONFIG), "g": OpenClipTextModel(VIT_BIGG_CONFIG)}
    table = lora_name_table(meta_unet(UNetFamily.SDXL), encoders)
    ldm = table["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"]
    assert ldm == table["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert ldm == table["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    value = table["lora_te2_text_model_encoder_layers_31_self_attn_v_proj"]
    assert value == table["text_encoder_2.text_model.encoder.layers.31.self_attn.v_proj"]
    assert (value.component, value.weight, value.rows) == (
        "g", "transformer.resblocks.31.attn.in_proj_weight", (2560, 3840))
    assert table["lora_te1_text_model_encoder_layers_0_mlp_fc1"].component == "l"
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1" not in table


@pytest.mark.parametrize("family", list(UNetFamily))
def test_every_unet_family_gets_a_name_for_every_weighted_module(family: UNetFamily) -> None:
    unet = meta_unet(family)
    paths = unet_paths(unet, unet.config)
    assert set(paths) == weighted_names(unet)
    assert len({diffusers for diffusers, _ in paths.values()}) == len(paths)
