"""unCLIP: the noise augmentation against its published schedule, an SD 2.1 unCLIP checkpoint
(written by the project's writer in the released layout) through unCLIPCheckpointLoader,
CLIPVisionEncode, unCLIPConditioning and KSampler, and SDXL "revision" (the image embedding in
place of the pooled text)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.diffusion.checkpoints.detect import detect_checkpoint
from engine.diffusion.checkpoints.unclip import hf_to_openclip_visual, openclip_visual_to_hf
from engine.diffusion.checkpoints.writer import random_checkpoint
from engine.diffusion.networks.clip_vision import ClipVisionOutput
from engine.diffusion.networks.noise_augment import augment, noise_level_for, unclip_adm
from engine.diffusion.sampling.conditioning import adm_vector
from nodes.unclip import unclip_weight_bytes
from tests.model_engine import ModelEngine, node, probed


def reference_alpha_bar(step: int) -> float:
    """prod_{i<=step} (1 - beta_i), beta_i = min(1 - f((i+1)/T) / f(i/T), 0.999),
    f(t) = cos((t + 0.008) / 1.008 * pi / 2) ** 2 (Nichol & Dhariwal's cosine schedule)."""
    def f(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    value = 1.0
    for i in range(step + 1):
        value *= 1 - min(1 - f((i + 1) / 1000) / f(i / 1000), 0.999)
    return value


def output(embeds: torch.Tensor) -> ClipVisionOutput:
    return ClipVisionOutput(embeds, torch.zeros(1), torch.zeros(1))


@pytest.mark.parametrize("level", [0, 100, 999])
def test_augmentation_follows_the_cosine_schedule_and_seed(level: int) -> None:
    embeds = torch.randn(1, 6)
    noised, level_embed = augment(embeds, level, seed=7)
    noise = torch.randn(1, 6, generator=torch.Generator().manual_seed(7))
    abar = reference_alpha_bar(level)
    expected = math.sqrt(abar) * embeds + math.sqrt(1 - abar) * noise
    assert torch.allclose(noised, expected, atol=1e-5)
    half = torch.exp(-math.log(10000) * torch.arange(3) / 3) * level
    assert torch.allclose(level_embed, torch.cat([half.cos(), half.sin()])[None], atol=1e-5)


def test_noise_augmentation_maps_to_a_step_as_comfyui_rounds_it() -> None:
    assert [noise_level_for(a) for a in (0.0, 0.5, 1.0)] == [0, 500, 999]


def test_adm_of_one_image_is_noised_embedding_and_level_times_strength() -> None:
    embeds = torch.randn(1, 4)
    entry = {"clip_vision_output": output(embeds), "strength": 0.5, "noise_augmentation": 0.1}
    adm = unclip_adm([entry], torch.device("cpu"), seed=3)
    noised, level_embed = augment(embeds, noise_level_for(0.1), 3)
    assert torch.allclose(adm, torch.cat([noised, level_embed], 1) * 0.5)


def test_the_vision_tower_keys_convert_both_ways_losslessly() -> None:
    tensors, _ = random_checkpoint("sd21_unclip_h")
    visual = {key.removeprefix("embedder.model.visual."): value
              for key, value in tensors.items() if key.startswith("embedder.model.visual.")}
    assert "transformer.resblocks.0.attn.in_proj_weight" in visual and "proj" in visual
    again = hf_to_openclip_visual(openclip_visual_to_hf(visual))
    assert again.keys() == visual.keys()
    assert all(torch.equal(again[key], visual[key]) for key in visual)


def test_an_unclip_checkpoint_is_detected_as_sd2_unclip_v_prediction() -> None:
    tensors, _ = random_checkpoint("sd21_unclip_h")
    layout = detect_checkpoint(tensors)
    assert layout.is_unclip and layout.prediction == "v"
    assert layout.describe() == "SD2.x unCLIP (v-prediction)"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> ModelEngine:
    engine = ModelEngine(tmp_path_factory.mktemp("unclip"))
    engine.checkpoint("sd21_unclip_h", "unclip.safetensors")
    return engine


def unclip_workflow(strength: float, noise_augmentation: float) -> dict[str, Any]:
    return {
        "ckpt": node("unCLIPCheckpointLoader", ckpt_name="unclip.safetensors"),
        "image": node("EmptyImage", width=32, height=32, batch_size=1, color=0x8040C0),
        "vision": node("CLIPVisionEncode", clip_vision=["ckpt", 3], image=["image", 0],
                       crop="center"),
        "text": node("CLIPTextEncode", text="a cat", clip=["ckpt", 1]),
        "neg": node("CLIPTextEncode", text="", clip=["ckpt", 1]),
        "unclip": node("unCLIPConditioning", conditioning=["text", 0],
                       clip_vision_output=["vision", 0], strength=strength,
                       noise_augmentation=noise_augmentation),
        "empty": node("EmptyLatentImage", width=32, height=32, batch_size=1),
        "sample": node("KSampler", model=["ckpt", 0], seed=5, steps=2, cfg=4.0,
                       sampler_name="euler", scheduler="normal", positive=["unclip", 0],
                       negative=["neg", 0], latent_image=["empty", 0], denoise=1.0)}


def sampled(engine: ModelEngine, strength: float, noise_augmentation: float) -> Any:
    result, _ = engine.run(probed(unclip_workflow(strength, noise_augmentation), "sample",
                                  "unclip", "text"))
    return result


def test_unclip_conditioning_appends_the_image_to_each_entry(engine: ModelEngine) -> None:
    result = sampled(engine, 0.8, 0.25)
    cond, options = result.values["unclip"][0][0][0]
    entry = options["unclip_conditioning"][-1]
    assert (entry["strength"], entry["noise_augmentation"]) == (0.8, 0.25)
    assert entry["clip_vision_output"].image_embeds.shape == (1, 32)
    assert torch.equal(cond, result.values["text"][0][0][0][0])


def test_the_image_and_its_noise_level_steer_the_sample(engine: ModelEngine) -> None:
    plain = sampled(engine, 0.0, 0.0).values["sample"][0][0]["samples"]
    steered = sampled(engine, 1.0, 0.0).values["sample"][0][0]["samples"]
    noisier = sampled(engine, 1.0, 0.9).values["sample"][0][0]["samples"]
    assert not torch.equal(plain, steered) and not torch.equal(steered, noisier)
    again = sampled(engine, 1.0, 0.9).values["sample"][0][0]["samples"]
    assert torch.equal(noisier, again)  # the embedding noise comes from the seed


def test_strength_zero_leaves_the_conditioning_as_it_was(engine: ModelEngine) -> None:
    result = sampled(engine, 0.0, 0.5)
    assert "unclip_conditioning" not in result.values["unclip"][0][0][0][1]


def test_sdxl_revision_replaces_the_pooled_text_with_the_noised_image(tmp_path: Path) -> None:
    engine = ModelEngine(tmp_path)
    result, _ = engine.run(probed({"ckpt": node(
        "CheckpointLoaderSimple", ckpt_name=engine.checkpoint("sdxl_base"))}, "ckpt"))
    model = result.values["ckpt"][0][0]
    pooled_width = 128  # the tiny bigG's; 1280 in the released model
    embeds = torch.randn(1, pooled_width)
    entry = {"clip_vision_output": output(embeds), "strength": 1.0, "noise_augmentation": 0.0}
    options = {"pooled_output": torch.randn(1, pooled_width), "unclip_conditioning": [entry]}
    y = adm_vector(model, options, "positive", torch.Size((1, 4, 8, 8)), torch.device("cpu"),
                   seed=20)
    noised, _ = augment(embeds, 0, seed=10)
    assert torch.allclose(y[:, :pooled_width], noised)
    plain = adm_vector(model, {"pooled_output": options["pooled_output"]}, "positive",
                       torch.Size((1, 4, 8, 8)), torch.device("cpu"))
    assert torch.equal(y[:, pooled_width:], plain[:, pooled_width:])


def test_the_unclip_loaders_size_estimate_is_what_its_load_keeps(tmp_path: Path) -> None:
    engine = ModelEngine(tmp_path)
    engine.checkpoint("sd21_unclip_h", "unclip.safetensors")
    engine.run(probed({"ckpt": node("unCLIPCheckpointLoader", ckpt_name="unclip.safetensors")},
                      "ckpt"))
    models = engine.services.model_manager
    path = tmp_path / "models" / "checkpoints" / "unclip.safetensors"
    assert unclip_weight_bytes(models, path) == models.resident_bytes() > 0
