"""SetUnionControlNetType (ComfyUI's type numbers on a copy of the CONTROL_NET, checked against
the model's type count) and ControlNetInpaintingAliMamaApply (for the SD ControlNets Loom runs,
ComfyUI applies the image as ControlNetApplyAdvanced does, the mask unused), end to end on a
tiny SDXL model with a ControlNet-Union file in the released layout."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.diffusion.checkpoints.controlnet_writer import write_random_union_controlnet
from engine.diffusion.patches.control import ControlModel
from nodes.controlnet import (
    ControlNetApplyAdvanced,
    ControlNetInpaintingAliMamaApply,
    SetUnionControlNetType,
)
from tests.diffusion.controlnet_testing import load, tiny_controlnet
from tests.model_engine import ModelEngine, node, probed


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> ModelEngine:
    engine = ModelEngine(tmp_path_factory.mktemp("controlnet_extra"))
    engine.checkpoint("sdxl_base", "tiny_sdxl.safetensors")
    write_random_union_controlnet(engine.base / "models" / "controlnet" / "union.safetensors")
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    (engine.base / "input").mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(engine.base / "input" / "hint.png")
    return engine


def union_file(tmp_path: Any, types: int) -> ControlModel:
    return load(write_random_union_controlnet(tmp_path / f"union{types}.safetensors",
                                              types=types))


def test_a_type_is_set_on_a_copy_with_comfyuis_number(tmp_path: Any) -> None:
    model = union_file(tmp_path, 8)
    (canny,) = SetUnionControlNetType().execute(None, model, "canny/lineart/anime_lineart/mlsd")
    (repaint,) = SetUnionControlNetType().execute(None, model, "repaint")
    assert (canny.control_type, repaint.control_type, model.control_type) == ((3,), (7,), ())
    assert canny.network is model.network


def test_auto_clears_the_type(tmp_path: Any) -> None:
    (typed,) = SetUnionControlNetType().execute(None, union_file(tmp_path, 8), "depth")
    (auto,) = SetUnionControlNetType().execute(None, typed, "auto")
    assert auto.control_type == ()


def test_a_type_the_model_was_not_trained_on_is_refused_by_name(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=r"control type 6 .*union6.safetensors.* knows 6 types"):
        SetUnionControlNetType().execute(None, union_file(tmp_path, 6), "tile")


def test_a_plain_controlnet_takes_the_type_and_ignores_it() -> None:
    (typed,) = SetUnionControlNetType().execute(None, ControlModel(tiny_controlnet()), "depth")
    assert typed.control_type == (1,)


def test_alimama_apply_is_the_advanced_apply_for_sd_controlnets() -> None:
    model = ControlModel(tiny_controlnet())
    cond = [[torch.randn(1, 77, 64), {}]]
    image, mask = torch.rand(1, 32, 32, 3), torch.ones(1, 32, 32)
    vae = object()
    ours = ControlNetInpaintingAliMamaApply().execute(None, cond, cond, model, vae, image, mask,
                                                      0.8, 0.1, 0.9)
    theirs = ControlNetApplyAdvanced().execute(None, cond, cond, model, image, 0.8, 0.1, 0.9,
                                               vae)
    for got, expected in zip(ours, theirs, strict=True):
        a, b = got[0][1]["control"], expected[0][1]["control"]
        assert (a.model, a.strength, a.start_percent, a.end_percent, a.vae) == \
            (b.model, b.strength, b.start_percent, b.end_percent, b.vae)
        assert torch.equal(a.hint, b.hint)


def workflow(control_type: str | None) -> dict[str, Any]:
    """Tiny SDXL, the union ControlNet with `control_type` (None: no ControlNet), 2 steps."""
    api = {"ckpt": node("CheckpointLoaderSimple", ckpt_name="tiny_sdxl.safetensors"),
           "pos": node("CLIPTextEncode", text="a house", clip=["ckpt", 1]),
           "neg": node("CLIPTextEncode", text="blurry", clip=["ckpt", 1]),
           "empty": node("EmptyLatentImage", width=64, height=64, batch_size=1),
           "hint": node("LoadImage", image="hint.png")}
    conds = (["pos", 0], ["neg", 0])
    if control_type is not None:
        api["cn"] = node("ControlNetLoader", control_net_name="union.safetensors")
        api["typed"] = node("SetUnionControlNetType", control_net=["cn", 0], type=control_type)
        api["apply"] = node("ControlNetApplyAdvanced", positive=conds[0], negative=conds[1],
                            control_net=["typed", 0], image=["hint", 0], strength=1.0,
                            start_percent=0.0, end_percent=1.0)
        conds = (["apply", 0], ["apply", 1])
    api["sample"] = node("KSampler", model=["ckpt", 0], seed=3, steps=2, cfg=4.0,
                         sampler_name="euler", scheduler="normal", positive=conds[0],
                         negative=conds[1], latent_image=["empty", 0], denoise=1.0)
    return api


def test_union_types_steer_an_sdxl_model_end_to_end(engine: ModelEngine) -> None:
    def latent(control_type: str | None) -> torch.Tensor:
        result, _ = engine.run(probed(workflow(control_type), "sample"))
        return result.values["sample"][0][0]["samples"]

    plain, auto, canny, depth = (latent(t) for t in (None, "auto",
                                                     "canny/lineart/anime_lineart/mlsd", "depth"))
    assert not torch.allclose(auto, plain)
    assert not torch.allclose(canny, auto) and not torch.allclose(canny, depth)
