"""Sampling through the engine on tiny random checkpoints: txt2img, determinism, progress and
previews, img2img, both kinds of inpainting, cfg 1, base -> refiner hand-off, custom sampling,
interruption, v-prediction and sampler validation. The newer samplers and custom sampling
nodes run in test_custom_sampling_runs.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.sampling import (
    COMFYUI_SAMPLER_NAMES,
    exponential,
    karras,
    polyexponential,
)
from engine.events import RecordingListener
from engine.executor import ExecutionResult
from engine.validation import validate_prompt
from tests.model_engine import ModelEngine, node, probed

STEPS = 3
SIZE = 64  # pixels: an 8 x 8 latent


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> ModelEngine:
    return sampling_engine(tmp_path_factory.mktemp("sampling"))


def sampling_engine(base: Path) -> ModelEngine:
    """An engine over `base` with a random photo and a right-half mask in its input folder."""
    engine = ModelEngine(base)
    inputs = engine.base / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(inputs / "photo.png")
    mask = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    mask[:, SIZE // 2:, 0] = 255  # red channel: the right half is repainted
    Image.fromarray(mask).save(inputs / "right_half.png")
    return engine


def checkpoint(engine: ModelEngine, kind: str) -> str:
    name = f"tiny_{kind}.safetensors"
    if not (engine.base / "models" / "checkpoints" / name).exists():
        engine.checkpoint(kind, name)
    return name


def prompts(engine: ModelEngine, kind: str = "sd15") -> dict[str, Any]:
    return {"ckpt": node("CheckpointLoaderSimple", ckpt_name=checkpoint(engine, kind)),
            "pos": node("CLIPTextEncode", text="a red fox in the snow", clip=["ckpt", 1]),
            "neg": node("CLIPTextEncode", text="blurry", clip=["ckpt", 1]),
            "empty": node("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=1)}


def ksampler(latent: str = "empty", **settings: Any) -> dict[str, Any]:
    inputs = {"model": ["ckpt", 0], "seed": 1, "steps": STEPS, "cfg": 6.0,
              "sampler_name": "euler", "scheduler": "normal", "positive": ["pos", 0],
              "negative": ["neg", 0], "latent_image": [latent, 0], "denoise": 1.0}
    return node("KSampler", **{**inputs, **settings})


def encoded_photo() -> dict[str, Any]:
    return {"photo": node("LoadImage", image="photo.png"),
            "encoded": node("VAEEncode", pixels=["photo", 0], vae=["ckpt", 2]),
            "mask": node("LoadImageMask", image="right_half.png", channel="red")}


def run(engine: ModelEngine, api: dict[str, Any], *probes: str
        ) -> tuple[ExecutionResult, RecordingListener]:
    return engine.run(probed(api, *probes))


def value(result: ExecutionResult, node_id: str, slot: int = 0) -> Any:
    return result.values[node_id][slot][0]


def samples(result: ExecutionResult, node_id: str, slot: int = 0) -> torch.Tensor:
    return value(result, node_id, slot)["samples"]


def progress_events(listener: RecordingListener) -> list[tuple[str, float, float]]:
    return [(data["node"], data["value"], data["max"]) for name, data in listener.events
            if name == "progress"]


@pytest.fixture
def unet_calls(engine: ModelEngine) -> Iterator[tuple[ModelEngine, list[torch.Size]]]:
    with recorded_unet_calls(engine) as calls:
        yield engine, calls


@contextmanager
def recorded_unet_calls(engine: ModelEngine) -> Iterator[list[torch.Size]]:
    """Records the input shape of every UNet call of the tiny sd15 model."""
    calls: list[torch.Size] = []
    result, _ = run(engine, prompts(engine), "ckpt")
    model: ModelHandle = value(result, "ckpt")
    handle = model.unet.register_forward_pre_hook(lambda _, args: calls.append(args[0].shape))
    try:
        yield calls
    finally:
        handle.remove()


def test_txt2img_saves_a_finite_image(engine: ModelEngine) -> None:
    api = {**prompts(engine), "sample": ksampler(),
           "decode": node("VAEDecode", samples=["sample", 0], vae=["ckpt", 2]),
           "save": node("SaveImage", images=["decode", 0], filename_prefix="txt2img")}
    result, _ = run(engine, api, "sample")
    image = value(result, "decode")
    assert image.shape == (1, SIZE, SIZE, 3) and torch.isfinite(image).all()
    assert torch.isfinite(samples(result, "sample")).all()
    assert len(result.outputs["save"]["images"]) == 1


def test_same_seed_is_bit_identical_and_another_seed_differs(engine: ModelEngine) -> None:
    latents = []
    for seed in (7, 7, 8):
        engine.executor.cache.clear()
        result, _ = run(engine, {**prompts(engine), "sample": ksampler(seed=seed)}, "sample")
        latents.append(samples(result, "sample"))
    assert torch.equal(latents[0], latents[1])
    assert not torch.allclose(latents[0], latents[2])


def test_progress_reports_every_step_with_a_preview(engine: ModelEngine) -> None:
    result, listener = run(engine, {**prompts(engine), "sample": ksampler(seed=2)}, "sample")
    assert progress_events(listener) == [("sample", step, STEPS) for step in (1, 2, 3)]
    previews = [image for node_id, image in listener.previews if node_id == "sample"]
    assert len(previews) == STEPS and previews[0].size == (SIZE, SIZE)


def test_preview_method_none_sends_no_previews(engine: ModelEngine) -> None:
    engine.services.args = SimpleNamespace(preview_method="none")
    try:
        _, listener = run(engine, {**prompts(engine), "sample": ksampler(seed=3)}, "sample")
    finally:
        engine.services.args = None
    assert len(progress_events(listener)) == STEPS and not listener.previews


def test_denoise_zero_returns_the_input_latent(engine: ModelEngine) -> None:
    api = {**prompts(engine), **encoded_photo(), "sample": ksampler("encoded", denoise=0.0)}
    result, listener = run(engine, api, "sample", "encoded")
    assert torch.equal(samples(result, "sample"), samples(result, "encoded"))
    assert not progress_events(listener)


def test_small_denoise_stays_closer_to_the_input_than_a_full_one(engine: ModelEngine) -> None:
    api = {**prompts(engine), **encoded_photo(), "light": ksampler("encoded", denoise=0.2),
           "full": ksampler("encoded", denoise=1.0)}
    result, _ = run(engine, api, "light", "full", "encoded")
    start = samples(result, "encoded")
    light = (samples(result, "light") - start).norm()
    assert 0 < light < (samples(result, "full") - start).norm()


def test_latent_noise_mask_repaints_only_the_masked_half(engine: ModelEngine) -> None:
    api = {**prompts(engine), **encoded_photo(),
           "masked": node("SetLatentNoiseMask", samples=["encoded", 0], mask=["mask", 0]),
           "sample": ksampler("masked")}
    result, _ = run(engine, api, "sample", "encoded")
    start, out = samples(result, "encoded"), samples(result, "sample")
    # kept cells come back equal up to the float rounding of the scale round trip
    assert torch.allclose(out[..., :4], start[..., :4], rtol=1e-5, atol=1e-4)
    assert not torch.allclose(out[..., 4:], start[..., 4:], atol=1e-2)
    assert torch.equal(value(result, "sample")["noise_mask"], value(result, "masked")["noise_mask"])


def test_vae_encode_for_inpaint_grows_the_mask_and_keeps_the_rest(engine: ModelEngine) -> None:
    api = {**prompts(engine), **encoded_photo(),
           "inpaint": node("VAEEncodeForInpaint", pixels=["photo", 0], vae=["ckpt", 2],
                           mask=["mask", 0], grow_mask_by=6),
           "sample": ksampler("inpaint", sampler_name="ddim")}
    result, _ = run(engine, api, "sample", "inpaint")
    noise_mask = value(result, "inpaint")["noise_mask"]
    # a 6 x 6 box with padding 3 grows the edge at column 32 two pixels to the left
    assert noise_mask.shape == (1, 1, SIZE, SIZE)
    assert noise_mask[..., 30:].min() == 1 and noise_mask[..., :30].max() == 0
    start, out = samples(result, "inpaint"), samples(result, "sample")
    assert torch.allclose(out[..., :3], start[..., :3], rtol=1e-5, atol=1e-4)
    assert not torch.allclose(out[..., 4:], start[..., 4:], atol=1e-2)


def test_inpaint_model_conditioning_feeds_the_nine_channel_unet(engine: ModelEngine) -> None:
    api = {**prompts(engine, "sd15_inpaint"), **encoded_photo(),
           "cond": node("InpaintModelConditioning", positive=["pos", 0], negative=["neg", 0],
                        vae=["ckpt", 2], pixels=["photo", 0], mask=["mask", 0],
                        noise_mask=True),
           "sample": ksampler(positive=["cond", 0], negative=["cond", 1],
                              latent_image=["cond", 2])}
    result, _ = run(engine, api, "ckpt")
    channels: list[int] = []
    hook = value(result, "ckpt").unet.register_forward_pre_hook(
        lambda _, args: channels.append(args[0].shape[1]))
    try:
        result, _ = run(engine, api, "sample")
    finally:
        hook.remove()
    assert channels == [9] * STEPS
    latent = value(result, "cond", 2)
    out = samples(result, "sample")
    assert torch.isfinite(out).all() and latent["noise_mask"].shape == (1, 1, SIZE, SIZE)
    assert torch.allclose(out[..., :4], latent["samples"][..., :4], rtol=1e-5, atol=1e-4)


def test_cfg_one_makes_one_model_call_per_step(unet_calls: Any) -> None:
    engine, calls = unet_calls
    run(engine, {**prompts(engine), "sample": ksampler(cfg=1.0, seed=11)}, "sample")
    assert [shape[0] for shape in calls] == [1] * STEPS
    calls.clear()
    run(engine, {**prompts(engine), "sample": ksampler(cfg=5.0, seed=11)}, "sample")
    assert [shape[0] for shape in calls] == [2] * STEPS  # cond and uncond in one batch


def test_sdxl_base_hands_off_to_the_refiner(engine: ModelEngine) -> None:
    steps, switch = 4, 2
    base = prompts(engine, "sdxl_base")
    api = {**base,
           "refiner": node("CheckpointLoaderSimple", ckpt_name=checkpoint(engine, "sdxl_refiner")),
           "rpos": node("CLIPTextEncodeSDXLRefiner", ascore=6.0, width=SIZE, height=SIZE,
                        text="a red fox in the snow", clip=["refiner", 1]),
           "rneg": node("CLIPTextEncodeSDXLRefiner", ascore=2.5, width=SIZE, height=SIZE,
                        text="blurry", clip=["refiner", 1]),
           "base_sample": node("KSamplerAdvanced", model=["ckpt", 0], add_noise="enable",
                               noise_seed=4, steps=steps, cfg=5.0, sampler_name="euler",
                               scheduler="normal", positive=["pos", 0], negative=["neg", 0],
                               latent_image=["empty", 0], start_at_step=0, end_at_step=switch,
                               return_with_leftover_noise="enable"),
           "refine": node("KSamplerAdvanced", model=["refiner", 0], add_noise="disable",
                          noise_seed=4, steps=steps, cfg=5.0, sampler_name="euler",
                          scheduler="normal", positive=["rpos", 0], negative=["rneg", 0],
                          latent_image=["base_sample", 0], start_at_step=switch,
                          end_at_step=10000, return_with_leftover_noise="disable"),
           "decode": node("VAEDecode", samples=["refine", 0], vae=["refiner", 2])}
    result, listener = run(engine, api, "refine", "decode")
    events = progress_events(listener)
    assert events == [("base_sample", 1, 2), ("base_sample", 2, 2), ("refine", 1, 2),
                      ("refine", 2, 2)]
    assert len(events) == steps and torch.isfinite(samples(result, "refine")).all()
    assert torch.isfinite(value(result, "decode")).all()


def custom_chain(sampler: str, scheduler: str, seed: int, cfg: float) -> dict[str, Any]:
    return {"noise": node("RandomNoise", noise_seed=seed),
            "select": node("KSamplerSelect", sampler_name=sampler),
            "sigmas": node("BasicScheduler", model=["ckpt", 0], scheduler=scheduler,
                           steps=STEPS, denoise=1.0),
            "guider": node("CFGGuider", model=["ckpt", 0], positive=["pos", 0],
                           negative=["neg", 0], cfg=cfg),
            "custom": node("SamplerCustomAdvanced", noise=["noise", 0], guider=["guider", 0],
                           sampler=["select", 0], sigmas=["sigmas", 0],
                           latent_image=["empty", 0]),
            "plain": node("SamplerCustom", model=["ckpt", 0], add_noise=True, noise_seed=seed,
                          cfg=cfg, positive=["pos", 0], negative=["neg", 0],
                          sampler=["select", 0], sigmas=["sigmas", 0],
                          latent_image=["empty", 0])}


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m"])
def test_custom_sampling_chain_equals_ksampler(engine: ModelEngine, sampler: str) -> None:
    api = {**prompts(engine), **custom_chain(sampler, "karras", 21, 6.5),
           "sample": ksampler(seed=21, cfg=6.5, sampler_name=sampler, scheduler="karras")}
    result, _ = run(engine, api, "custom", "plain", "sample")
    expected = samples(result, "sample")
    assert torch.equal(samples(result, "custom"), expected)
    assert torch.equal(samples(result, "plain"), expected)
    denoised = samples(result, "custom", 1)
    assert denoised.shape == expected.shape and torch.isfinite(denoised).all()


def test_basic_guider_without_noise_equals_ksampler_advanced(engine: ModelEngine) -> None:
    api = {**prompts(engine), **encoded_photo(),
           "noise": node("DisableNoise"),
           "select": node("KSamplerSelect", sampler_name="euler"),
           "sigmas": node("BasicScheduler", model=["ckpt", 0], scheduler="simple", steps=STEPS,
                          denoise=0.5),
           "guider": node("BasicGuider", model=["ckpt", 0], conditioning=["pos", 0]),
           "custom": node("SamplerCustomAdvanced", noise=["noise", 0], guider=["guider", 0],
                          sampler=["select", 0], sigmas=["sigmas", 0],
                          latent_image=["encoded", 0]),
           "advanced": node("KSamplerAdvanced", model=["ckpt", 0], add_noise="disable",
                            noise_seed=0, steps=2 * STEPS, cfg=1.0, sampler_name="euler",
                            scheduler="simple", positive=["pos", 0], negative=["neg", 0],
                            latent_image=["encoded", 0], start_at_step=STEPS,
                            end_at_step=10000, return_with_leftover_noise="disable")}
    result, _ = run(engine, api, "custom", "advanced")
    assert torch.equal(samples(result, "custom"), samples(result, "advanced"))


def test_scheduler_nodes_give_the_formula_sigmas(engine: ModelEngine) -> None:
    common = {"steps": 5, "sigma_max": 10.0, "sigma_min": 0.1}
    api = {**prompts(engine),
           "exponential": node("ExponentialScheduler", **common),
           "poly": node("PolyexponentialScheduler", **common, rho=2.0),
           "turbo": node("SDTurboScheduler", model=["ckpt", 0], steps=2, denoise=0.5)}
    result, _ = run(engine, api, "exponential", "poly", "turbo", "ckpt")
    assert torch.equal(value(result, "exponential"), exponential(5, 0.1, 10.0))
    assert torch.equal(value(result, "poly"), polyexponential(5, 0.1, 10.0, 2.0))
    sampling = value(result, "ckpt").sampling
    expected = sampling.sigma(torch.tensor([499, 399]))  # denoise 0.5 skips 999..599
    assert torch.equal(value(result, "turbo"), torch.cat([expected, expected.new_zeros(1)]))


def test_split_and_flip_sigmas(engine: ModelEngine) -> None:
    api = {"karras": node("KarrasScheduler", steps=4, sigma_max=14.614642,
                          sigma_min=0.0291675, rho=7.0),
           "split": node("SplitSigmas", sigmas=["karras", 0], step=2),
           "flip": node("FlipSigmas", sigmas=["split", 1])}
    result, _ = run(engine, api, "split", "flip")
    sigmas = karras(4, 0.0291675, 14.614642, 7.0)
    assert torch.equal(value(result, "karras"), sigmas)
    assert torch.equal(value(result, "split"), sigmas[:3])
    assert torch.equal(value(result, "split", 1), sigmas[2:])
    flipped = value(result, "flip")
    assert flipped[0] == pytest.approx(0.0001) and torch.equal(flipped[1:], sigmas[2:4].flip(0))


class InterruptAtFirstProgress(RecordingListener):
    """Asks the executor to stop, from another thread, once the first step is reported."""

    def __init__(self, engine: ModelEngine) -> None:
        super().__init__()
        self.engine = engine

    def event(self, name: str, data: dict[str, Any]) -> None:
        super().event(name, data)
        if name == "progress" and not self.engine.executor.interrupt.is_set():
            stopper = threading.Thread(target=self.engine.executor.interrupt.set)
            stopper.start()
            stopper.join()


def test_interrupt_stops_sampling_after_the_current_step(engine: ModelEngine) -> None:
    api = {**prompts(engine), "sample": ksampler(seed=31, steps=10)}
    checked = validate_prompt(probed(api, "sample"), engine.registry, engine.services)
    listener = InterruptAtFirstProgress(engine)
    result = engine.executor.execute(checked.prompt, checked.outputs, listener=listener)
    assert result.status == "interrupted"
    assert len(progress_events(listener)) == 1
    assert "execution_interrupted" in listener.names()


def test_v_prediction_checkpoint_samples(engine: ModelEngine) -> None:
    api = {**prompts(engine, "sd21v"), "sample": ksampler(sampler_name="dpmpp_2m")}
    result, _ = run(engine, api, "sample", "ckpt")
    assert value(result, "ckpt").sampling.prediction == "v_prediction"
    assert torch.isfinite(samples(result, "sample")).all()


def test_model_sampling_discrete_replaces_the_prediction(engine: ModelEngine) -> None:
    api = {**prompts(engine),
           "vpred": node("ModelSamplingDiscrete", model=["ckpt", 0], sampling="v_prediction",
                         zsnr=True),
           "eps_sample": ksampler(seed=5),
           "v_sample": ksampler(seed=5, model=["vpred", 0])}
    result, _ = run(engine, api, "eps_sample", "v_sample", "vpred", "ckpt")
    patched, original = value(result, "vpred"), value(result, "ckpt")
    assert patched.sampling.prediction == "v_prediction" and patched.unet is original.unet
    assert original.sampling.prediction == "eps"
    assert float(patched.sampling.sigma_max) > 4000  # zero terminal SNR
    assert not torch.allclose(samples(result, "eps_sample"), samples(result, "v_sample"))


@pytest.mark.parametrize("sampler", ["dpm_2", "dpmpp_sde", "lcm"])
def test_other_samplers_run_through_ksampler(engine: ModelEngine, sampler: str) -> None:
    api = {**prompts(engine), "sample": ksampler(sampler_name=sampler, steps=2)}
    result, listener = run(engine, api, "sample")
    assert torch.isfinite(samples(result, "sample")).all() and len(progress_events(listener)) == 2


def test_every_sampler_name_passes_validation(engine: ModelEngine) -> None:
    for name in COMFYUI_SAMPLER_NAMES:
        api = {**prompts(engine), "sample": ksampler(sampler_name=name),
               "select": node("KSamplerSelect", sampler_name=name)}
        checked = validate_prompt(probed(api, "sample", "select"), engine.registry,
                                  engine.services)
        assert checked.error is None and not checked.node_errors, (name, checked.to_json())


def test_a_batch_latent_gets_per_sample_noise(engine: ModelEngine) -> None:
    api = {**prompts(engine),
           "batch": node("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=2),
           "second": node("LatentFromBatch", samples=["batch", 0], batch_index=1, length=1),
           "both": ksampler("batch", seed=9), "one": ksampler("second", seed=9)}
    result, _ = run(engine, api, "both", "one")
    both, one = samples(result, "both"), samples(result, "one")
    assert both.shape[0] == 2 and not torch.allclose(both[0], both[1])
    # batch_index = [1]: the second sample's noise, so the same image as in the full batch
    assert torch.allclose(one[0], both[1], rtol=1e-4, atol=1e-3)


def test_area_conditioning_changes_only_its_region(engine: ModelEngine) -> None:
    api = {**prompts(engine),
           "large": node("EmptyLatentImage", width=2 * SIZE, height=2 * SIZE, batch_size=1),
           "other": node("CLIPTextEncode", text="a castle on a hill", clip=["ckpt", 1]),
           "area": node("ConditioningSetArea", conditioning=["other", 0], width=2 * SIZE,
                        height=SIZE, x=0, y=0, strength=1.0),
           "combined": node("ConditioningCombine", conditioning_1=["pos", 0],
                            conditioning_2=["area", 0]),
           "with_area": ksampler("large", positive=["combined", 0], seed=13, steps=1),
           "without": ksampler("large", seed=13, steps=1)}
    result, _ = run(engine, api, "with_area", "without")
    diff = (samples(result, "with_area") - samples(result, "without")).abs()
    assert diff[..., :8, :].max() > 1e-3  # the top half (the area, 8 of 16 rows) changed
    assert diff[..., 8:, :].max() == 0  # the rest is predicted exactly as without it
