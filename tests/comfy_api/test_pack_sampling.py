"""A pack's own sampler function (comfy.samplers.KSAMPLER) and a pack's guider overriding
predict_noise run inside Loom's sampling and match Loom's own sampler and guider."""

from __future__ import annotations

from typing import Any

import torch

from tests.comfy_api.test_classic_api import base
from tests.model_engine import ModelEngine, node, probed


def custom(sampler: list[Any], guider: list[Any], seed: int = 5) -> dict[str, Any]:
    return {"noise": node("RandomNoise", noise_seed=seed),
            "sigmas": node("BasicScheduler", model=["ckpt", 0], scheduler="normal", steps=3,
                           denoise=1.0),
            "euler": node("KSamplerSelect", sampler_name="euler"),
            "cfg": node("CFGGuider", model=["ckpt", 0], positive=["pos", 0],
                        negative=["neg", 0], cfg=6.0),
            "sample": node("SamplerCustomAdvanced", noise=["noise", 0], guider=guider,
                           sampler=sampler, sigmas=["sigmas", 0], latent_image=["empty", 0])}


def sampled(engine: ModelEngine, api: dict[str, Any]) -> torch.Tensor:
    result, _ = engine.run(probed(api, "sample"))
    return result.values["sample"][0][0]["samples"]


def test_a_packs_euler_function_gives_looms_euler_latent(bound: ModelEngine) -> None:
    loom = sampled(bound, {**base(bound), **custom(["euler", 0], ["cfg", 0])})
    api = {**base(bound), **custom(["pack", 0], ["cfg", 0]),
           "pack": node("PackEulerSampler", step_scale=1.0)}
    assert torch.allclose(sampled(bound, api), loom, atol=1e-5)


def test_a_packs_sampler_gets_its_extra_options_as_keywords(bound: ModelEngine) -> None:
    full = {**base(bound), **custom(["pack", 0], ["cfg", 0]),
            "pack": node("PackEulerSampler", step_scale=1.0)}
    half = {**full, "pack": node("PackEulerSampler", step_scale=0.5)}
    assert not torch.allclose(sampled(bound, half), sampled(bound, full))


def test_a_packs_sampler_reports_each_step(bound: ModelEngine) -> None:
    api = {**base(bound), **custom(["pack", 0], ["cfg", 0], seed=9),
           "pack": node("PackEulerSampler", step_scale=1.0)}
    _, listener = bound.run(probed(api, "sample"))
    steps = [(d["value"], d["max"]) for name, d in listener.events
             if name == "progress" and d["node"] == "sample"]
    assert steps == [(1, 3), (2, 3), (3, 3)]


def test_a_guider_overriding_predict_noise_with_calc_cond_batch_matches_cfg(
        bound: ModelEngine) -> None:
    loom = sampled(bound, {**base(bound), **custom(["euler", 0], ["cfg", 0])})
    api = {**base(bound), **custom(["euler", 0], ["pack", 0]),
           "pack": node("PackGuider", model=["ckpt", 0], positive=["pos", 0],
                        negative=["neg", 0], cfg=6.0, kind="batched")}
    assert torch.allclose(sampled(bound, api), loom, atol=1e-5)


def test_a_guider_calling_sampling_function_guides_at_its_own_scale(bound: ModelEngine) -> None:
    loom = {**base(bound), **custom(["euler", 0], ["cfg", 0])}
    loom["cfg"] = node("CFGGuider", model=["ckpt", 0], positive=["pos", 0],
                       negative=["neg", 0], cfg=3.0)
    api = {**base(bound), **custom(["euler", 0], ["pack", 0]),
           "pack": node("PackGuider", model=["ckpt", 0], positive=["pos", 0],
                        negative=["neg", 0], cfg=6.0, kind="sampling_function")}
    assert torch.allclose(sampled(bound, api), sampled(bound, loom), atol=1e-5)


def test_a_pack_sampler_and_a_pack_guider_run_together(bound: ModelEngine) -> None:
    loom = sampled(bound, {**base(bound), **custom(["euler", 0], ["cfg", 0], seed=11)})
    api = {**base(bound), **custom(["pack", 0], ["guider", 0], seed=11),
           "pack": node("PackEulerSampler", step_scale=1.0),
           "guider": node("PackGuider", model=["ckpt", 0], positive=["pos", 0],
                          negative=["neg", 0], cfg=6.0, kind="batched")}
    assert torch.allclose(sampled(bound, api), loom, atol=1e-5)


def test_a_packs_sampler_object_runs_the_whole_sampling_itself(bound: ModelEngine) -> None:
    loom = sampled(bound, {**base(bound), **custom(["euler", 0], ["cfg", 0], seed=13)})
    api = {**base(bound), **custom(["pack", 0], ["cfg", 0], seed=13),
           "pack": node("PackSamplerObject")}
    result, listener = bound.run(probed(api, "sample"))
    assert torch.allclose(result.values["sample"][0][0]["samples"], loom, atol=1e-5)
    assert [d["value"] for name, d in listener.events
            if name == "progress" and d["node"] == "sample"] == [1, 2, 3]
