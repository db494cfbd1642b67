"""ControlNet nodes: loaders through the engine and its model manager, the apply nodes'
CONDITIONING rules (new lists, shared and chained controls, strength 0), and a two-ControlNet
workflow end to end through KSampler and VAEDecode."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.diffusion.checkpoints.controlnet_loader import CONTROL_PREFIX, DIFF_MARKER
from engine.diffusion.checkpoints.controlnet_writer import (
    random_controlnet,
    write_random_controlnet,
    write_random_t2i_adapter,
)
from engine.diffusion.networks.t2i_adapter import T2IAdapter
from engine.diffusion.patches.control import Control, ControlModel
from nodes import builtin_node_types
from nodes.controlnet import ControlNetApply, ControlNetApplyAdvanced
from tests.diffusion.controlnet_testing import save, tiny_controlnet
from tests.model_engine import ModelEngine, node, probed

HAS_KSAMPLER = any(t.schema.name == "KSampler" for t in builtin_node_types())


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> ModelEngine:
    engine = ModelEngine(tmp_path_factory.mktemp("controlnet"))
    engine.checkpoint("sd15", "tiny_sd15.safetensors")
    folder = engine.base / "models" / "controlnet"
    write_random_controlnet(folder / "canny.safetensors", seed=1)
    write_random_controlnet(folder / "depth.safetensors", seed=2)
    write_random_t2i_adapter(folder / "t2iadapter_sketch.safetensors", hint_channels=1)
    deltas, metadata = random_controlnet(seed=5)
    save(folder / "diff_canny.safetensors", {**deltas, DIFF_MARKER: torch.zeros(1)}, metadata)
    pixels = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    (engine.base / "input").mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(engine.base / "input" / "edges.png")  # other aspect than 64x64
    return engine


def value(result: Any, node_id: str, slot: int = 0) -> Any:
    return result.values[node_id][slot][0]


# --- loaders -------------------------------------------------------------------------------


def test_a_controlnet_used_by_two_nodes_is_loaded_once(engine: ModelEngine) -> None:
    api = {"1": node("ControlNetLoader", control_net_name="canny.safetensors"),
           "2": node("ControlNetLoader", control_net_name="canny.safetensors")}
    result, _ = engine.run(probed(api, "1", "2"))
    assert value(result, "1") is value(result, "2")
    assert isinstance(value(result, "1"), ControlModel)


def test_t2i_adapters_load_through_the_controlnet_loader(engine: ModelEngine) -> None:
    api = {"1": node("ControlNetLoader", control_net_name="t2iadapter_sketch.safetensors")}
    result, _ = engine.run(probed(api, "1"))
    assert isinstance(value(result, "1").network, T2IAdapter)


def test_diff_controlnet_loader_adds_the_deltas_to_the_model(engine: ModelEngine) -> None:
    api = {"1": node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors"),
           "2": node("DiffControlNetLoader", model=["1", 0],
                     control_net_name="diff_canny.safetensors")}
    result, _ = engine.run(probed(api, "1", "2"))
    unet = value(result, "1").unet.state_dict()
    weights = value(result, "2").network.state_dict()
    deltas, _ = random_controlnet(seed=5)
    key = "input_blocks.1.0.in_layers.2.weight"
    assert torch.allclose(weights[key], unet[key] + deltas[CONTROL_PREFIX + key])


# --- apply nodes ---------------------------------------------------------------------------


def conditioning(text_seed: int) -> list[list[Any]]:
    cond = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(text_seed))
    return [[cond, {"pooled_output": None}], [cond * 2, {"strength": 0.5}]]


def snapshot(value: list[list[Any]]) -> list[tuple[int, dict[str, Any]]]:
    return [(id(cond), dict(options)) for cond, options in value]


def advanced(positive: Any, negative: Any, model: ControlModel, strength: float = 1.0,
             **kwargs: Any) -> tuple[Any, Any]:
    image = torch.rand(1, 32, 32, 3)
    return ControlNetApplyAdvanced().execute(None, positive, negative, model, image, strength,
                                             kwargs.get("start", 0.0), kwargs.get("end", 1.0))


def test_apply_returns_new_lists_and_never_mutates_its_inputs() -> None:
    positive, negative = conditioning(0), conditioning(1)
    before = snapshot(positive), snapshot(negative)
    out_positive, out_negative = advanced(positive, negative, ControlModel(tiny_controlnet()))
    assert (snapshot(positive), snapshot(negative)) == before
    assert out_positive is not positive and out_positive[0][1] is not positive[0][1]
    assert out_positive[0][0] is positive[0][0]  # tensors are shared, not copied
    assert out_positive[1][1]["strength"] == 0.5 and "control" not in positive[0][1]


def test_positive_and_negative_share_one_control_object() -> None:
    model = ControlModel(tiny_controlnet())
    positive, negative = advanced(conditioning(0), conditioning(1), model, 0.7, start=0.1)
    controls = {id(options["control"]) for _, options in [*positive, *negative]}
    assert len(controls) == 1
    control = positive[0][1]["control"]
    assert isinstance(control, Control) and control.model is model
    assert (control.strength, control.start_percent, control.end_percent) == (0.7, 0.1, 1.0)
    assert positive[0][1]["control_apply_to_uncond"] is False


def test_applying_twice_chains_the_second_onto_the_first() -> None:
    first_model, second_model = ControlModel(tiny_controlnet()), ControlModel(tiny_controlnet())
    positive, negative = advanced(conditioning(0), conditioning(1), first_model)
    first = positive[0][1]["control"]
    positive, negative = advanced(positive, negative, second_model, 0.5)
    second = positive[0][1]["control"]
    assert second.model is second_model and second.previous is first
    assert negative[1][1]["control"] is second
    assert [link.model for link in second.chain()] == [second_model, first_model]


def test_zero_strength_returns_the_inputs_unchanged() -> None:
    positive, negative = conditioning(0), conditioning(1)
    out = advanced(positive, negative, ControlModel(tiny_controlnet()), 0.0)
    assert out[0] is positive and out[1] is negative


def test_old_apply_node_chains_and_lends_its_control_to_the_uncond() -> None:
    model = ControlModel(tiny_controlnet())
    base = conditioning(0)
    (once,) = ControlNetApply().execute(None, base, model, torch.rand(1, 8, 8, 3), 0.8)
    (twice,) = ControlNetApply().execute(None, once, model, torch.rand(1, 8, 8, 3), 1.0)
    assert all(options["control_apply_to_uncond"] for _, options in twice)
    assert twice[0][1]["control"].previous is once[0][1]["control"]
    assert once[0][1]["control"] is not once[1][1]["control"]  # one per entry, as ComfyUI
    assert "control" not in base[0][1]


# --- end to end ----------------------------------------------------------------------------


def workflow(strengths: tuple[float, float] | None, start: float = 0.0) -> dict[str, Any]:
    """Checkpoint -> two ControlNets applied in a chain -> KSampler -> VAEDecode; None leaves
    the ControlNets out."""
    api = {"ckpt": node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors"),
           "pos": node("CLIPTextEncode", text="a house by a lake", clip=["ckpt", 1]),
           "neg": node("CLIPTextEncode", text="blurry", clip=["ckpt", 1]),
           "empty": node("EmptyLatentImage", width=64, height=64, batch_size=2),
           "hint": node("LoadImage", image="edges.png")}
    conds = (["pos", 0], ["neg", 0])
    if strengths is not None:
        for index, (name, strength) in enumerate(zip(("canny", "depth"), strengths,
                                                     strict=True)):
            api[f"cn{index}"] = node("ControlNetLoader", control_net_name=f"{name}.safetensors")
            api[f"apply{index}"] = node(
                "ControlNetApplyAdvanced", positive=conds[0], negative=conds[1],
                control_net=[f"cn{index}", 0], image=["hint", 0], strength=strength,
                start_percent=start, end_percent=1.0)
            conds = ([f"apply{index}", 0], [f"apply{index}", 1])
    api["sample"] = node("KSampler", model=["ckpt", 0], seed=7, steps=3, cfg=5.0,
                         sampler_name="euler", scheduler="normal", positive=conds[0],
                         negative=conds[1], latent_image=["empty", 0], denoise=1.0)
    api["decode"] = node("VAEDecode", samples=["sample", 0], vae=["ckpt", 2])
    return api


def images(engine: ModelEngine, api: dict[str, Any]) -> torch.Tensor:
    result, _ = engine.run(probed(api, "decode"))
    return value(result, "decode")


@pytest.mark.skipif(not HAS_KSAMPLER, reason="KSampler is not registered yet (sampling nodes)")
def test_two_chained_controlnets_steer_sampling_end_to_end(engine: ModelEngine) -> None:
    plain = images(engine, workflow(None))
    assert plain.shape == (2, 64, 64, 3)
    assert torch.equal(images(engine, workflow((0.0, 0.0))), plain)
    # active only from the last percent: residuals are asked for but never added
    assert torch.equal(images(engine, workflow((1.0, 1.0), start=1.0)), plain)
    one = images(engine, workflow((1.0, 0.0)))
    both = images(engine, workflow((1.0, 1.0)))
    assert not torch.allclose(one, plain) and not torch.allclose(both, one)


@pytest.mark.skipif(not HAS_KSAMPLER, reason="KSampler is not registered yet (sampling nodes)")
def test_sdxl_controlnet_steers_an_sdxl_model(engine: ModelEngine) -> None:
    engine.checkpoint("sdxl_base", "tiny_sdxl.safetensors")
    write_random_controlnet(engine.base / "models" / "controlnet" / "xl.safetensors",
                            "sdxl_base")
    api = {**workflow(None), "ckpt": node("CheckpointLoaderSimple",
                                          ckpt_name="tiny_sdxl.safetensors")}
    plain = images(engine, api)
    api["cn"] = node("ControlNetLoader", control_net_name="xl.safetensors")
    api["apply"] = node("ControlNetApplyAdvanced", positive=["pos", 0], negative=["neg", 0],
                        control_net=["cn", 0], image=["hint", 0], strength=1.0,
                        start_percent=0.0, end_percent=0.5)
    api["sample"]["inputs"].update(positive=["apply", 0], negative=["apply", 1])
    assert not torch.allclose(images(engine, api), plain)
