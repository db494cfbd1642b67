"""Packs load through ComfyUI's module names; a broken pack says what it lacks."""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.model_engine import ModelEngine


def test_every_test_pack_but_the_broken_one_loads(bound: ModelEngine) -> None:
    assert sorted(bound.registry.loaded_packs) == ["comfy_basics", "expand_pack", "lora_pack",
                                                   "route_pack", "v3_pack"]
    for name in ("EncodeAndSample", "ModelFacts", "V3ScaleImage", "V3AddOne", "RoutePackPing"):
        assert name in bound.registry


def test_a_missing_package_is_named_with_the_pip_requirements_command(
        bound: ModelEngine) -> None:
    (error,) = [e for e in bound.registry.pack_errors if e.name == "broken_pack"]
    assert "'loom_test_package_that_is_not_installed'" in error.summary
    assert "pip install -r" in error.summary and "broken_pack/requirements.txt" in error.summary


def test_nodes_module_has_comfyuis_attributes_on_looms_package(bound: ModelEngine) -> None:
    import nodes
    assert nodes.MAX_RESOLUTION == 16384
    assert "KSampler" in nodes.NODE_CLASS_MAPPINGS
    assert nodes.NODE_CLASS_MAPPINGS["EncodeAndSample"].FUNCTION == "run"  # a pack's own class
    assert nodes.KSampler.FUNCTION == "sample"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["KSamplerAdvanced"] == "KSampler (Advanced)"
    assert nodes.ImageScale.upscale_methods[0] == "nearest-exact"


def test_an_unknown_nodes_attribute_is_an_attribute_error_naming_it(bound: ModelEngine) -> None:
    import nodes
    with pytest.raises(AttributeError, match="NoSuchNode"):
        _ = nodes.NoSuchNode


def test_comfy_extras_modules_expose_looms_nodes_that_comfyui_defines_there(
        bound: ModelEngine) -> None:
    extras = importlib.import_module("comfy_extras.nodes_custom_sampler")
    assert extras.SamplerCustom.INPUT_TYPES()["required"]["add_noise"][0] == "BOOLEAN"
    assert extras.Noise_RandomNoise(3).seed == 3


def test_comfyui_internals_import_and_raise_naming_themselves_when_used(
        bound: ModelEngine) -> None:
    attention = importlib.import_module("comfy.ldm.modules.attention")

    class Patched(attention.BasicTransformerBlock):  # packs subclass them at import time
        pass

    with pytest.raises(NotImplementedError, match="comfy.ldm.modules.attention.optimized_"):
        attention.optimized_attention(None, None, None, 8)
    with pytest.raises(NotImplementedError, match="BasicTransformerBlock"):
        Patched()


def test_implemented_modules_report_missing_names_truthfully(bound: ModelEngine) -> None:
    import comfy.model_management
    assert not hasattr(comfy.model_management, "no_such_function")


def test_classic_calls_use_comfyuis_parameter_order_and_reject_unknown_names(
        bound: ModelEngine) -> None:
    import nodes
    images = torch.zeros(1, 4, 4, 3)
    preview = nodes.PreviewImage().save_images(images, "ignored_prefix")  # SaveImage's order
    assert preview["ui"]["images"][0]["type"] == "temp"
    with pytest.raises(TypeError, match="unexpected argument"):
        nodes.ImageInvert().invert(image=images, strength=2)
