"""The newer samplers and the custom sampling nodes running through the engine on a tiny
random SD1.5 checkpoint: KSampler with each new sampler family, CFG++'s extra uncond
evaluation, DualCFGGuider against CFGGuider, AddNoise, SamplerLCMUpscale, SamplerSASolver."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.model_engine import ModelEngine, node
from tests.test_sampling_nodes import (
    STEPS,
    encoded_photo,
    ksampler,
    progress_events,
    prompts,
    recorded_unet_calls,
    run,
    samples,
    sampling_engine,
    value,
)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> ModelEngine:
    return sampling_engine(tmp_path_factory.mktemp("custom_sampling"))


@pytest.fixture
def unet_calls(engine: ModelEngine) -> Iterator[tuple[ModelEngine, list[torch.Size]]]:
    with recorded_unet_calls(engine) as calls:
        yield engine, calls


@pytest.mark.parametrize("sampler", ["euler_cfg_pp", "dpmpp_2s_ancestral_cfg_pp",
                                     "res_multistep_ancestral", "gradient_estimation",
                                     "exp_heun_2_x0_sde", "seeds_3", "er_sde", "sa_solver_pece"])
def test_new_samplers_run_through_ksampler(engine: ModelEngine, sampler: str) -> None:
    api = {**prompts(engine), "sample": ksampler(sampler_name=sampler, steps=2)}
    result, listener = run(engine, api, "sample")
    assert torch.isfinite(samples(result, "sample")).all() and len(progress_events(listener)) == 2


def test_cfg_pp_evaluates_the_uncond_even_at_cfg_one(unet_calls: Any) -> None:
    engine, calls = unet_calls
    run(engine, {**prompts(engine), "sample": ksampler(cfg=1.0, sampler_name="euler_cfg_pp")},
        "sample")
    assert [shape[0] for shape in calls] == [2] * STEPS  # cond and uncond, one batch a step


def test_cfg_pp_inpainting_keeps_the_unmasked_half(engine: ModelEngine) -> None:
    api = {**prompts(engine), **encoded_photo(),
           "masked": node("SetLatentNoiseMask", samples=["encoded", 0], mask=["mask", 0]),
           "sample": ksampler("masked", sampler_name="res_multistep_cfg_pp", cfg=1.5)}
    result, _ = run(engine, api, "sample", "encoded")
    start, out = samples(result, "encoded"), samples(result, "sample")
    assert torch.allclose(out[..., :4], start[..., :4], rtol=1e-5, atol=1e-4)
    assert not torch.allclose(out[..., 4:], start[..., 4:], atol=1e-2)


def guided_chain(guider: dict[str, Any], seed: int = 4) -> dict[str, Any]:
    return {"noise": node("RandomNoise", noise_seed=seed),
            "select": node("KSamplerSelect", sampler_name="dpmpp_2m"),
            "sigmas": node("BasicScheduler", model=["ckpt", 0], scheduler="karras",
                           steps=STEPS, denoise=1.0),
            "guider": guider,
            "custom": node("SamplerCustomAdvanced", noise=["noise", 0], guider=["guider", 0],
                           sampler=["select", 0], sigmas=["sigmas", 0],
                           latent_image=["empty", 0])}


def dual(cfg_conds: float, cfg_cond2_negative: float, style: str) -> dict[str, Any]:
    return node("DualCFGGuider", model=["ckpt", 0], cond1=["pos", 0], cond2=["other", 0],
                negative=["neg", 0], cfg_conds=cfg_conds,
                cfg_cond2_negative=cfg_cond2_negative, style=style)


def guided_sample(engine: ModelEngine, guider: dict[str, Any]) -> torch.Tensor:
    api = {**prompts(engine), **guided_chain(guider),
           "other": node("CLIPTextEncode", text="a lighthouse at dusk", clip=["ckpt", 1])}
    result, _ = run(engine, api, "custom")
    return samples(result, "custom")


def test_dual_cfg_with_equal_scales_is_cfg_against_the_negative(engine: ModelEngine) -> None:
    """N + (M - N) c + (P - M) c = N + (P - N) c: cond2 cancels out."""
    cfg = node("CFGGuider", model=["ckpt", 0], positive=["pos", 0], negative=["neg", 0],
               cfg=5.0)
    expected = guided_sample(engine, cfg)
    assert torch.allclose(guided_sample(engine, dual(5.0, 5.0, "regular")), expected, atol=1e-4)
    # nested with cfg_conds 1: N + c2 (P - N)
    assert torch.allclose(guided_sample(engine, dual(1.0, 5.0, "nested")), expected, atol=1e-4)
    assert not torch.allclose(guided_sample(engine, dual(3.0, 5.0, "regular")), expected,
                              atol=1e-2)


def test_dual_cfg_at_scales_one_is_the_basic_guider(unet_calls: Any) -> None:
    """Both scales 1: only cond1 is evaluated, exactly as BasicGuider does."""
    engine, calls = unet_calls
    basic = guided_sample(engine, node("BasicGuider", model=["ckpt", 0],
                                       conditioning=["pos", 0]))
    calls.clear()
    assert torch.equal(guided_sample(engine, dual(1.0, 1.0, "regular")), basic)
    assert [shape[0] for shape in calls] == [1] * STEPS


def test_add_noise_then_sampling_without_noise_is_img2img(engine: ModelEngine) -> None:
    """AddNoise at the first sigma of a denoise-0.5 schedule, then DisableNoise, equals
    KSampler at denoise 0.5 with the same seed."""
    sigmas = node("BasicScheduler", model=["ckpt", 0], scheduler="normal", steps=STEPS,
                  denoise=0.5)
    api = {**prompts(engine), **encoded_photo(),
           "sigmas": sigmas, "seed": node("RandomNoise", noise_seed=8),
           "noised": node("AddNoise", model=["ckpt", 0], noise=["seed", 0],
                          sigmas=["sigmas", 0], latent_image=["encoded", 0]),
           "none": node("DisableNoise"),
           "guider": node("CFGGuider", model=["ckpt", 0], positive=["pos", 0],
                          negative=["neg", 0], cfg=6.0),
           "select": node("KSamplerSelect", sampler_name="euler"),
           "custom": node("SamplerCustomAdvanced", noise=["none", 0], guider=["guider", 0],
                          sampler=["select", 0], sigmas=["sigmas", 0],
                          latent_image=["noised", 0]),
           "sample": ksampler("encoded", seed=8, denoise=0.5)}
    result, _ = run(engine, api, "custom", "sample")
    assert torch.allclose(samples(result, "custom"), samples(result, "sample"), atol=1e-3)


def test_lcm_upscale_sampler_returns_a_larger_latent(engine: ModelEngine) -> None:
    api = {**prompts(engine),
           "lcm": node("SamplerLCMUpscale", scale_ratio=2.0, scale_steps=-1,
                       upscale_method="bislerp"),
           "sigmas": node("BasicScheduler", model=["ckpt", 0], scheduler="sgm_uniform",
                          steps=4, denoise=1.0),
           "custom": node("SamplerCustom", model=["ckpt", 0], add_noise=True, noise_seed=3,
                          cfg=1.0, positive=["pos", 0], negative=["neg", 0],
                          sampler=["lcm", 0], sigmas=["sigmas", 0], latent_image=["empty", 0])}
    result, listener = run(engine, api, "custom")
    out = samples(result, "custom")
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()
    assert len(progress_events(listener)) == 4


def test_sa_solver_node_samples_with_the_models_interval(engine: ModelEngine) -> None:
    api = {**prompts(engine),
           "sa": node("SamplerSASolver", model=["ckpt", 0], eta=1.0, sde_start_percent=0.2,
                      sde_end_percent=0.8, s_noise=1.0, predictor_order=3,
                      corrector_order=4, use_pece=False, simple_order_2=False),
           "sigmas": node("BasicScheduler", model=["ckpt", 0], scheduler="karras", steps=STEPS,
                          denoise=1.0),
           "custom": node("SamplerCustom", model=["ckpt", 0], add_noise=True, noise_seed=3,
                          cfg=6.0, positive=["pos", 0], negative=["neg", 0],
                          sampler=["sa", 0], sigmas=["sigmas", 0], latent_image=["empty", 0]),
           "sample": ksampler(seed=3, sampler_name="sa_solver", scheduler="karras")}
    result, _ = run(engine, api, "custom", "sample")
    # the node's default widgets are KSampler's sa_solver defaults
    assert torch.equal(samples(result, "custom"), samples(result, "sample"))
    assert value(result, "sa").options.sde_end_sigma > 0
