"""comfy.lora's key maps name the same LoRA modules and model weights as ComfyUI 0.8's for the
recorded SD1.5 and SDXL layouts (full-size networks on the meta device), and load_lora turns
the recorded kohya LoRA into one adapter per module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.diffusion.networks.clip_text import CLIP_L_CONFIG, ClipTextModel
from engine.diffusion.networks.openclip_text import VIT_BIGG_CONFIG, OpenClipTextModel
from engine.diffusion.networks.unet import UNet, UNetConfig, UNetFamily
from tests.comfy_api.comfy_lora_names import expected_clip_map, expected_unet_map
from tests.diffusion.manifests import manifest
from tests.model_engine import ModelEngine

SD15_CLIP = {"l": "cond_stage_model.transformer."}
SDXL_CLIP = {"l": "conditioner.embedders.0.transformer.", "g": "conditioner.embedders.1.model."}


def meta_unet(family: UNetFamily) -> UNet:
    with torch.device("meta"):
        return UNet(UNetConfig.preset(family))


def meta_encoders(*names: str) -> nn.ModuleDict:
    with torch.device("meta"):
        built = {"l": lambda: ClipTextModel(CLIP_L_CONFIG),
                 "g": lambda: OpenClipTextModel(VIT_BIGG_CONFIG)}
        return nn.ModuleDict({name: built[name]() for name in names})


def differences(found: dict[str, str], expected: dict[str, str]) -> list[str]:
    wrong = [f"{key}: {found.get(key)} != {value}" for key, value in expected.items()
             if found.get(key) != value]
    extra = [f"{key} (not ComfyUI's)" for key in found.keys() - expected.keys()]
    return sorted(wrong + extra)


@pytest.mark.parametrize(("layout", "family"), [("sd15", UNetFamily.SD1),
                                                ("sdxl_base", UNetFamily.SDXL)])
def test_the_unet_key_map_is_comfyuis(bound: ModelEngine, layout: str,
                                      family: UNetFamily) -> None:
    import comfy.lora
    found = comfy.lora.model_lora_keys_unet(meta_unet(family))
    assert differences(found, expected_unet_map(set(manifest(layout)))) == []


@pytest.mark.parametrize(("layout", "roots"), [("sd15", SD15_CLIP), ("sdxl_base", SDXL_CLIP)])
def test_the_clip_key_map_is_comfyuis(bound: ModelEngine, layout: str,
                                      roots: dict[str, str]) -> None:
    import comfy.lora
    found = comfy.lora.model_lora_keys_clip(meta_encoders(*roots))
    assert differences(found, expected_clip_map(set(manifest(layout)), roots)) == []


def test_the_clip_key_map_adds_to_the_map_given(bound: ModelEngine) -> None:
    import comfy.lora
    given = {"lora_unet_x": "diffusion_model.x.weight"}
    found = comfy.lora.model_lora_keys_clip(meta_encoders("l"), given)
    assert found is given and "lora_te_text_model_encoder_layers_0_mlp_fc1" in given


def test_load_lora_gives_one_lora_adapter_per_module_of_the_kohya_file(
        bound: ModelEngine) -> None:
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_unet(meta_unet(UNetFamily.SD1))
    comfy.lora.model_lora_keys_clip(meta_encoders("l"), key_map)
    lora = {key: torch.full(shape, 4.0) if key.endswith(".alpha") else torch.zeros(shape)
            for key, (_, shape) in manifest("lora_sd15_kohya").items()}  # rank 4: small
    loaded = comfy.lora.load_lora(lora, key_map)
    assert len(loaded) == 264 and {adapter.name for adapter in loaded.values()} == {"lora"}
    up, down, alpha, mid, dora_scale, reshape = loaded[
        "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"].weights
    assert (tuple(up.shape), tuple(down.shape), alpha) == ((3072, 4), (4, 768), 4.0)
    assert (mid, dora_scale, reshape) == (None, None, None)
