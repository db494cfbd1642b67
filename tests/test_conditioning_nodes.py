"""Conditioning and inpainting nodes: what each stores (ComfyUI's option keys and values), and
area, mask and timestep-range conditioning through the engine on tiny checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.context import InterruptFlag, NodeContext, Services
from engine.executor import ExecutionResult
from engine.paths import Paths
from nodes.conditioning import (
    ConditioningAverage,
    ConditioningCombine,
    ConditioningConcat,
    ConditioningSetArea,
    ConditioningSetAreaPercentage,
    ConditioningSetAreaStrength,
    ConditioningSetMask,
    ConditioningSetTimestepRange,
    ConditioningZeroOut,
)
from nodes.inpaint import crop_to_cells, grey_masked, grow_mask
from tests.model_engine import ModelEngine, node, probed

SIZE = 64


@pytest.fixture
def ctx(tmp_path: Path) -> NodeContext:
    return NodeContext(node_id="1", class_type="Test", prompt_id="p",
                       services=Services(Paths.from_base(tmp_path)), interrupt=InterruptFlag())


def cond(value: float, tokens: int = 3, **options: Any) -> list[Any]:
    return [torch.full((1, tokens, 2), float(value)), options]


def test_combine_keeps_every_entry(ctx: NodeContext) -> None:
    first, second = [cond(1)], [cond(2), cond(3)]
    (combined,) = ConditioningCombine().execute(ctx, first, second)
    assert [float(pair[0][0, 0, 0]) for pair in combined] == [1.0, 2.0, 3.0]


def test_average_mixes_tokens_and_pooled_outputs(ctx: NodeContext) -> None:
    to = [cond(1, pooled_output=torch.ones(1, 4))]
    source = [cond(3, pooled_output=torch.full((1, 4), 5.0))]
    (out,) = ConditioningAverage().execute(ctx, to, source, 0.25)
    assert torch.allclose(out[0][0], torch.full((1, 3, 2), 0.25 * 1 + 0.75 * 3))
    assert torch.allclose(out[0][1]["pooled_output"], torch.full((1, 4), 0.25 + 0.75 * 5))
    assert torch.equal(to[0][1]["pooled_output"], torch.ones(1, 4))  # input untouched


def test_average_pads_a_shorter_source_with_zero_tokens(ctx: NodeContext) -> None:
    (out,) = ConditioningAverage().execute(ctx, [cond(1, tokens=4)], [cond(3, tokens=2)], 0.5)
    assert out[0][0][0, :, 0].tolist() == [2.0, 2.0, 0.5, 0.5]
    (cut,) = ConditioningAverage().execute(ctx, [cond(1, tokens=2)], [cond(3, tokens=4)], 0.5)
    assert cut[0][0].shape == (1, 2, 2)


def test_concat_appends_the_source_tokens(ctx: NodeContext) -> None:
    (out,) = ConditioningConcat().execute(ctx, [cond(1, tokens=2)], [cond(3, tokens=3)])
    assert out[0][0][0, :, 0].tolist() == [1.0, 1.0, 3.0, 3.0, 3.0]


def test_set_area_stores_latent_cells_without_touching_the_input(ctx: NodeContext) -> None:
    original = [cond(1)]
    (out,) = ConditioningSetArea().execute(ctx, original, 256, 128, 64, 40, 2.0)
    assert out[0][1] == {"area": (16, 32, 5, 8), "strength": 2.0, "set_area_to_bounds": False}
    assert original[0][1] == {} and out[0][0] is original[0][0]


def test_set_area_percentage_stores_fractions(ctx: NodeContext) -> None:
    (out,) = ConditioningSetAreaPercentage().execute(ctx, [cond(1)], 0.5, 0.25, 0.1, 0.2, 1.5)
    assert out[0][1]["area"] == ("percentage", 0.25, 0.5, 0.2, 0.1)
    assert out[0][1]["strength"] == 1.5


def test_set_area_strength(ctx: NodeContext) -> None:
    (out,) = ConditioningSetAreaStrength().execute(ctx, [cond(1, area=(1, 1, 0, 0))], 0.3)
    assert out[0][1] == {"area": (1, 1, 0, 0), "strength": 0.3}


def test_set_mask_stores_mask_strength_and_bounds_flag(ctx: NodeContext) -> None:
    mask = torch.ones(16, 16)
    (default,) = ConditioningSetMask().execute(ctx, [cond(1)], mask, 0.7, "default")
    (bounds,) = ConditioningSetMask().execute(ctx, [cond(1)], mask, 0.7, "mask bounds")
    assert default[0][1]["mask"].shape == (1, 16, 16) and default[0][1]["mask_strength"] == 0.7
    assert default[0][1]["set_area_to_bounds"] is False
    assert bounds[0][1]["set_area_to_bounds"] is True


def test_set_timestep_range(ctx: NodeContext) -> None:
    (out,) = ConditioningSetTimestepRange().execute(ctx, [cond(1)], 0.2, 0.8)
    assert out[0][1] == {"start_percent": 0.2, "end_percent": 0.8}


def test_zero_out_zeros_tokens_and_pooled(ctx: NodeContext) -> None:
    (out,) = ConditioningZeroOut().execute(ctx, [cond(4, pooled_output=torch.ones(1, 4))])
    assert not out[0][0].any() and not out[0][1]["pooled_output"].any()
    assert out[0][0].shape == (1, 3, 2)


def test_grow_mask_dilates_by_the_box_size() -> None:
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:] = 0.6  # rounds to 1
    grown = grow_mask(mask, 6)[..., :16, :16]
    assert grown[0, 0, 0].tolist() == [0.0] * 6 + [1.0] * 10  # 2 cells left of the edge
    assert torch.equal(grow_mask(mask, 0), mask)


def test_grey_masked_sets_masked_pixels_to_half_grey() -> None:
    pixels = torch.rand(1, 8, 8, 4)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :] = 1.0
    grey = grey_masked(pixels, mask)
    assert grey.shape == (1, 8, 8, 3)
    assert torch.allclose(grey[:, :4], torch.tensor(0.5))
    assert torch.allclose(grey[:, 4:], pixels[:, 4:, :, :3])


def test_crop_to_cells_centres_the_crop() -> None:
    pixels, mask = torch.rand(1, 21, 19, 3), torch.rand(1, 1, 21, 19)
    cropped, cropped_mask = crop_to_cells(pixels, mask, 8)
    assert cropped.shape == (1, 16, 16, 3) and cropped_mask.shape == (1, 1, 16, 16)
    assert torch.equal(cropped, pixels[:, 2:18, 1:17])


# -- through the engine --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> ModelEngine:
    engine = ModelEngine(tmp_path_factory.mktemp("conditioning"))
    engine.checkpoint("sd15", "tiny_sd15.safetensors")
    inputs = engine.base / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(inputs / "photo.png")
    mask = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    mask[:, SIZE // 2:, 0] = 255
    Image.fromarray(mask).save(inputs / "right_half.png")
    return engine


def graph(**extra: Any) -> dict[str, Any]:
    return {"ckpt": node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors"),
            "pos": node("CLIPTextEncode", text="a red fox", clip=["ckpt", 1]),
            "neg": node("CLIPTextEncode", text="blurry", clip=["ckpt", 1]),
            "other": node("CLIPTextEncode", text="a castle", clip=["ckpt", 1]),
            "empty": node("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=1),
            "photo": node("LoadImage", image="photo.png"),
            "mask": node("LoadImageMask", image="right_half.png", channel="red"), **extra}


def sampler(positive: str, seed: int = 3, steps: int = 2) -> dict[str, Any]:
    return node("KSampler", model=["ckpt", 0], seed=seed, steps=steps, cfg=5.0,
                sampler_name="euler", scheduler="normal", positive=[positive, 0],
                negative=["neg", 0], latent_image=["empty", 0], denoise=1.0)


def run(engine: ModelEngine, api: dict[str, Any], *probes: str) -> ExecutionResult:
    result, _ = engine.run(probed(api, *probes))
    return result


def latent(result: ExecutionResult, node_id: str) -> torch.Tensor:
    return result.values[node_id][0][0]["samples"]


def combined_with(name: str, body: dict[str, Any]) -> dict[str, Any]:
    return {name: body, f"{name}_combined": node("ConditioningCombine",
                                                 conditioning_1=["pos", 0],
                                                 conditioning_2=[name, 0])}


def test_full_timestep_range_changes_nothing(engine: ModelEngine) -> None:
    api = graph(**combined_with("ranged", node("ConditioningSetTimestepRange",
                                               conditioning=["pos", 0], start=0.0, end=1.0)),
                plain=sampler("pos"), with_range=sampler("ranged"))
    result = run(engine, api, "plain", "with_range")
    assert torch.equal(latent(result, "plain"), latent(result, "with_range"))


def test_a_range_that_never_starts_leaves_the_prompt_alone(engine: ModelEngine) -> None:
    api = graph(**combined_with("never", node("ConditioningSetTimestepRange",
                                              conditioning=["other", 0], start=1.0, end=1.0)),
                plain=sampler("pos"), with_never=sampler("never_combined"))
    result = run(engine, api, "plain", "with_never")
    assert torch.equal(latent(result, "plain"), latent(result, "with_never"))


def test_a_late_range_changes_only_the_late_steps(engine: ModelEngine) -> None:
    api = graph(**combined_with("late", node("ConditioningSetTimestepRange",
                                             conditioning=["other", 0], start=0.5, end=1.0)),
                plain=sampler("pos", steps=1), late_one=sampler("late_combined", steps=1),
                plain_two=sampler("pos"), late_two=sampler("late_combined"))
    result = run(engine, api, "plain", "late_one", "plain_two", "late_two")
    # one step at sigma_max: the late prompt sits out; two steps: it joins the second one
    assert torch.equal(latent(result, "plain"), latent(result, "late_one"))
    assert not torch.allclose(latent(result, "plain_two"), latent(result, "late_two"))


@pytest.mark.parametrize("set_cond_area", ["default", "mask bounds"])
def test_mask_conditioning_acts_inside_its_mask(engine: ModelEngine, set_cond_area: str) -> None:
    api = graph(**combined_with("masked", node("ConditioningSetMask", conditioning=["other", 0],
                                               mask=["mask", 0], strength=1.0,
                                               set_cond_area=set_cond_area)),
                plain=sampler("pos", steps=1), with_mask=sampler("masked_combined", steps=1))
    result = run(engine, api, "plain", "with_mask")
    diff = (latent(result, "plain") - latent(result, "with_mask")).abs()
    assert diff[..., 5:].max() > 1e-3  # the masked right half (latent columns 4..7)
    scale = latent(result, "plain").abs().max()
    assert diff[..., :4].max() <= 1e-5 * scale  # outside the mask: weight 0


def test_percentage_area_runs(engine: ModelEngine) -> None:
    api = graph(**combined_with("area", node("ConditioningSetAreaPercentage",
                                             conditioning=["other", 0], width=0.5, height=1.0,
                                             x=0.5, y=0.0, strength=1.0)),
                plain=sampler("pos", steps=1), with_area=sampler("area_combined", steps=1))
    result = run(engine, api, "plain", "with_area")
    diff = (latent(result, "plain") - latent(result, "with_area")).abs()
    assert diff[..., :4].max() == 0 and diff[..., 4:].max() > 1e-3


def test_vae_encode_for_inpaint_encodes_the_greyed_image(engine: ModelEngine) -> None:
    api = graph(inpaint=node("VAEEncodeForInpaint", pixels=["photo", 0], vae=["ckpt", 2],
                             mask=["mask", 0], grow_mask_by=0))
    result = run(engine, api, "inpaint", "photo", "mask", "ckpt")
    vae = result.values["ckpt"][2][0]
    pixels, mask = result.values["photo"][0][0], result.values["mask"][0][0]
    expected = vae.encode(grey_masked(pixels, mask.reshape(1, 1, SIZE, SIZE)))
    out = result.values["inpaint"][0][0]
    assert torch.equal(out["samples"], expected)
    assert torch.equal(out["noise_mask"], mask.reshape(1, 1, SIZE, SIZE))


@pytest.mark.parametrize("noise_mask", [True, False])
def test_inpaint_model_conditioning_outputs(engine: ModelEngine, noise_mask: bool) -> None:
    api = graph(cond=node("InpaintModelConditioning", positive=["pos", 0], negative=["neg", 0],
                          vae=["ckpt", 2], pixels=["photo", 0], mask=["mask", 0],
                          noise_mask=noise_mask))
    result = run(engine, api, "cond", "photo", "mask", "ckpt")
    vae = result.values["ckpt"][2][0]
    pixels, mask = result.values["photo"][0][0], result.values["mask"][0][0]
    positive, negative, out = (result.values["cond"][slot][0] for slot in range(3))
    for conditioning in (positive, negative):
        options = conditioning[0][1]
        assert torch.equal(options["concat_mask"], mask.reshape(1, 1, SIZE, SIZE))
        assert torch.equal(options["concat_latent_image"],
                           vae.encode(grey_masked(pixels, options["concat_mask"])))
    assert torch.equal(out["samples"], vae.encode(pixels))
    assert ("noise_mask" in out) is noise_mask
