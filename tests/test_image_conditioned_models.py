"""The SD x4 upscaler and Lotus-D: their networks' extra inputs, detection of the checkpoints
the project's writer makes in their real layouts, SD_4XUpscale_Conditioning's and
LotusConditioning's behaviour against ComfyUI's published rules (reference values computed
here, independently), and a whole workflow for each on tiny stand-ins."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.diffusion.checkpoints.detect import detect_checkpoint, detect_unet_file
from engine.diffusion.checkpoints.save import save_checkpoint
from engine.diffusion.checkpoints.writer import random_checkpoint, write_tensors
from engine.diffusion.networks.unet import UNet, UNetConfig, UNetFamily
from engine.diffusion.sampling.conditioning import SamplingInputs, adm_vector, concat_channels
from engine.diffusion.sampling.image_conditioned import (
    lotus_null_prompt,
    lotus_task_embedding,
    x4_concat,
    x4_noise_level,
)
from engine.image_ops import spread_to_batch
from nodes.image_conditioning import SD_4XUpscale_Conditioning
from tests.diffusion.manifests import meta_state
from tests.model_engine import ModelEngine, node, probed

CPU = torch.device("cpu")


def x4_alphas_cumprod() -> np.ndarray:
    """abar_t of the x4 upscaler's schedules (its sampling and its low-res augmentation):
    betas = linspace(sqrt(1e-4), sqrt(2e-2), 1000) ** 2, in float64."""
    betas = np.linspace(1e-4 ** 0.5, 2e-2 ** 0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def reference_x4_scales(level: int) -> tuple[float, float]:
    """sqrt(abar_t), sqrt(1 - abar_t) at one augmentation level, rounded to float32."""
    abar = x4_alphas_cumprod()[level]
    return float(np.float32(math.sqrt(abar))), float(np.float32(math.sqrt(1.0 - abar)))


# --- the networks ---------------------------------------------------------------------------

def test_a_level_without_self_attention_attends_to_the_text_twice() -> None:
    config = UNetConfig.tiny(UNetFamily.SD_X4)
    unet = UNet(config)
    # tiny layout: levels (0, 1, 2), attention at 1 and 2, self-attention only at 2
    upper = unet.input_blocks[3][1].transformer_blocks[0]
    lower = unet.input_blocks[5][1].transformer_blocks[0]
    middle = unet.middle_block[1].transformer_blocks[0]
    assert upper.attn1.to_k.in_features == config.context_dim != upper.attn1.to_q.in_features
    for block in (lower, middle):
        assert block.attn1.to_k.in_features == block.attn1.to_q.in_features


def test_the_class_label_is_looked_up_in_an_embedding_table() -> None:
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny(UNetFamily.SD_X4)).eval()
    assert tuple(unet.label_emb.weight.shape) == (1000, unet.config.time_embed_dim)
    x, t = torch.randn(1, 7, 8, 8), torch.tensor([500.0])
    context = torch.randn(1, 3, unet.config.context_dim)
    with torch.no_grad():
        low, high = (unet(x, t, context, torch.tensor([level])) for level in (0, 350))
    assert not torch.equal(low, high)


def test_class_labels_must_be_one_per_sample() -> None:
    unet = UNet(UNetConfig.tiny(UNetFamily.SD_X4))
    with pytest.raises(ValueError, match="one class label per sample"):
        unet(torch.randn(1, 7, 8, 8), torch.tensor([1.0]), torch.randn(1, 3, 40),
             torch.zeros(1, 4))


# --- detection ------------------------------------------------------------------------------

def test_the_released_x4_layout_is_the_x4_upscaler_with_sd2_text_and_a_kl_f4_vae() -> None:
    layout = detect_checkpoint(meta_state("sd_x4_upscaler"))
    assert (layout.family, layout.in_channels, layout.model_channels) == ("sd_x4", 7, 256)
    assert (layout.prediction, layout.latent_scale) == ("v", 0.08333)
    assert layout.text_prefixes == {"clip_h": "cond_stage_model.model."}
    assert layout.text_family == "sd2"
    assert layout.describe() == "Stable Diffusion x4 upscaler (v-prediction)"


def test_a_tiny_x4_checkpoint_from_the_writer_is_detected() -> None:
    tensors, _ = random_checkpoint("sd_x4_upscaler")
    layout = detect_checkpoint(tensors)
    assert (layout.family, layout.in_channels, layout.prediction) == ("sd_x4", 7, "v")


def test_an_sd2_unet_with_a_4_wide_y_is_lotus_with_the_img_to_img_rule() -> None:
    unet = {key.removeprefix("model.diffusion_model."): value
            for key, value in meta_state("sd21v").items()
            if key.startswith("model.diffusion_model.")}
    unet["label_emb.0.0.weight"] = torch.empty(1280, 4, device="meta")
    layout = detect_unet_file(unet)
    assert (layout.family, layout.adm_in_channels, layout.prediction) == ("lotus", 4,
                                                                          "img_to_img")
    assert not layout.is_unclip


def test_a_tiny_lotus_unet_file_from_the_writer_is_detected() -> None:
    tensors, metadata = random_checkpoint("lotus_d")
    assert "input_blocks.0.0.weight" in tensors  # no model.diffusion_model. prefix
    assert detect_unet_file(tensors, metadata["loom.family"]).family == "lotus"


# --- SD_4XUpscale_Conditioning --------------------------------------------------------------

def upscale(images: torch.Tensor, scale_ratio: float = 2.0, augmentation: float = 0.1
            ) -> tuple[Any, Any, Any]:
    positive = [[torch.zeros(1, 2, 8), {"strength": 1.0}]]
    negative = [[torch.ones(1, 2, 8), {}]]
    return SD_4XUpscale_Conditioning().execute(None, images, positive, negative, scale_ratio,
                                               augmentation)


def test_the_latent_is_a_quarter_of_the_scaled_size_and_zero() -> None:
    _, _, latent = upscale(torch.rand(2, 10, 14, 3), scale_ratio=2.0)
    assert tuple(latent.samples.shape) == (2, 4, 20 // 4, 28 // 4)
    assert not latent.samples.any()


def test_both_prompts_carry_the_low_res_pixels_in_minus_one_to_one() -> None:
    images = torch.rand(1, 16, 16, 3)
    positive, negative, _ = upscale(images, scale_ratio=4.0, augmentation=0.25)
    for conditioning in (positive, negative):
        options = conditioning[0][1]
        assert options["noise_augmentation"] == 0.25
        assert torch.allclose(options["concat_image"], images.movedim(-1, 1) * 2 - 1)
    assert positive[0][1]["strength"] == 1.0 and "strength" not in negative[0][1]


def test_a_scale_below_one_latent_cell_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="scale_ratio 0.1 .* raise scale_ratio"):
        upscale(torch.rand(1, 16, 16, 3), scale_ratio=0.1)


@pytest.mark.parametrize(("augmentation", "level"), [(0.0, 0), (0.5, 175), (1.0, 350)])
def test_the_noise_level_is_350_times_the_augmentation_rounded(augmentation: float,
                                                               level: int) -> None:
    assert x4_noise_level(augmentation) == level


@pytest.mark.parametrize("augmentation", [0.1, 0.6])
def test_the_low_res_image_is_noised_by_its_schedule_from_the_seed_minus_10(
        augmentation: float) -> None:
    image = torch.rand(1, 3, 6, 6) * 2 - 1
    options = {"concat_image": image, "noise_augmentation": augmentation}
    got = x4_concat(options, torch.Size((1, 4, 6, 6)), CPU, seed=42)
    signal, noise_scale = reference_x4_scales(round(350 * augmentation))
    noise = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(32))
    assert torch.allclose(got, signal * image + noise_scale * noise, atol=1e-6)


def test_without_augmentation_the_image_passes_unchanged() -> None:
    image = torch.rand(1, 3, 6, 6)
    got = x4_concat({"concat_image": image}, torch.Size((1, 4, 6, 6)), CPU, seed=1)
    assert torch.equal(got, image)


def test_without_an_image_the_channels_are_black() -> None:
    got = x4_concat({}, torch.Size((2, 4, 5, 7)), CPU, seed=1)
    assert tuple(got.shape) == (2, 3, 5, 7) and not got.any()


def test_the_image_is_resized_to_the_latent_and_spread_over_the_batch() -> None:
    image = torch.rand(1, 3, 4, 4)
    got = x4_concat({"concat_image": image}, torch.Size((3, 4, 8, 8)), CPU, seed=1)
    assert tuple(got.shape) == (3, 3, 8, 8)
    assert torch.equal(got[0], got[2])


def test_batches_are_spread_by_nearest_index_as_comfyui_does() -> None:
    values = torch.arange(5).view(5, 1)
    assert spread_to_batch(values, 2).flatten().tolist() == [0, 4]
    assert spread_to_batch(values[:2], 5).flatten().tolist() == [0, 0, 1, 1, 1]
    assert spread_to_batch(values, 1).flatten().tolist() == [0]


# --- LotusConditioning ----------------------------------------------------------------------

def test_the_null_prompt_is_comfyuis_inlined_embedding_in_float32() -> None:
    prompt = lotus_null_prompt()
    assert tuple(prompt.shape) == (1, 2, 1024) and prompt.dtype == torch.float32
    # numbers read from ComfyUI 0.8.0 comfy_extras/nodes_lotus.py
    assert prompt[0, 0, :3].tolist() == [-0.3134765625, -0.447509765625, -0.00823974609375]
    assert prompt[0, 1, -3:].tolist() == [1.0361328125, -0.67333984375, 1.5009765625]
    assert prompt[0, 0].max().item() == 13.0234375 and prompt[0, 0].min().item() == -5.7578125


def test_the_task_embedding_is_sin_and_cos_of_one_and_zero() -> None:
    expected = [math.sin(1.0), 0.0, math.cos(1.0), 1.0]
    assert torch.allclose(lotus_task_embedding(CPU), torch.tensor([expected]))


# --- whole workflows ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> ModelEngine:
    engine = ModelEngine(tmp_path_factory.mktemp("image_conditioned"))
    engine.checkpoint("sd_x4_upscaler", "x4-upscaler-ema.safetensors")
    models = engine.base / "models"
    write_tensors(models / "diffusion_models" / "lotus-depth-d-v1-1.safetensors",
                  *random_checkpoint("lotus_d"))
    sd15, _ = random_checkpoint("sd15")
    write_tensors(models / "vae" / "vae-ft-mse-840000-ema-pruned.safetensors",
                  {key: value for key, value in sd15.items()
                   if key.startswith("first_stage_model.")})
    return engine


def x4_workflow(augmentation: float) -> dict[str, Any]:
    return {
        "ckpt": node("CheckpointLoaderSimple", ckpt_name="x4-upscaler-ema.safetensors"),
        "image": node("EmptyImage", width=16, height=12, batch_size=1, color=0x8040C0),
        "pos": node("CLIPTextEncode", text="a sharp photo", clip=["ckpt", 1]),
        "neg": node("CLIPTextEncode", text="blurry", clip=["ckpt", 1]),
        "cond": node("SD_4XUpscale_Conditioning", images=["image", 0], positive=["pos", 0],
                     negative=["neg", 0], scale_ratio=4.0, noise_augmentation=augmentation),
        "sample": node("KSampler", model=["ckpt", 0], seed=11, steps=2, cfg=4.0,
                       sampler_name="euler", scheduler="normal", positive=["cond", 0],
                       negative=["cond", 1], latent_image=["cond", 2], denoise=1.0),
        "decode": node("VAEDecode", samples=["sample", 0], vae=["ckpt", 2])}


def test_the_x4_workflow_gives_an_image_four_times_the_input(engine: ModelEngine) -> None:
    result, _ = engine.run(probed(x4_workflow(0.2), "decode", "ckpt"))
    model = result.values["ckpt"][0][0]
    assert (model.family, model.sampling.prediction) == ("sd_x4", "v_prediction")
    image = result.values["decode"][0][0]
    assert tuple(image.shape) == (1, 48, 64, 3) and torch.isfinite(image).all()


def test_the_augmentation_steers_the_x4_sample_reproducibly(engine: ModelEngine) -> None:
    def sample(augmentation: float) -> torch.Tensor:
        result, _ = engine.run(probed(x4_workflow(augmentation), "sample"))
        return result.values["sample"][0][0].samples

    plain, noised = sample(0.0), sample(0.5)
    assert not torch.equal(plain, noised)
    assert torch.equal(noised, sample(0.5))


def test_the_x4_model_gets_the_class_label_and_the_concat(engine: ModelEngine) -> None:
    result, _ = engine.run(probed({"ckpt": x4_workflow(0.0)["ckpt"]}, "ckpt"))
    model = result.values["ckpt"][0][0]
    options = {"concat_image": torch.rand(1, 3, 3, 4), "noise_augmentation": 0.5}
    label = adm_vector(model, options, "positive", torch.Size((2, 4, 3, 4)), CPU)
    assert label.tolist() == [175] and label.dtype == torch.long
    abar = x4_alphas_cumprod()
    assert model.sampling.sigma_max.item() == pytest.approx(math.sqrt(1 / abar[-1] - 1),
                                                           rel=1e-5)
    assert model.sampling.sigma_min.item() == pytest.approx(math.sqrt(1 / abar[0] - 1),
                                                           rel=1e-5)


def lotus_workflow() -> dict[str, Any]:
    """ComfyUI's Lotus depth template (Comfy-Org/workflow_templates,
    templates/image_lotus_depth_v1_1.json), its nodes, file names and widget values: the
    image's latent, one euler step from sigma 999 (SetFirstSigma) without noise, guided by
    LotusConditioning alone, decoded and inverted."""
    return {
        "unet": node("UNETLoader", unet_name="lotus-depth-d-v1-1.safetensors",
                     weight_dtype="default"),
        "vae": node("VAELoader", vae_name="vae-ft-mse-840000-ema-pruned.safetensors"),
        "image": node("EmptyImage", width=32, height=32, batch_size=1, color=0x406080),
        "encode": node("VAEEncode", pixels=["image", 0], vae=["vae", 0]),
        "cond": node("LotusConditioning"),
        "guider": node("BasicGuider", model=["unet", 0], conditioning=["cond", 0]),
        "sampler": node("KSamplerSelect", sampler_name="euler"),
        "schedule": node("BasicScheduler", model=["unet", 0], scheduler="normal", steps=1,
                         denoise=1.0),
        "first": node("SetFirstSigma", sigmas=["schedule", 0], sigma=999.0000000000002),
        "noise": node("DisableNoise"),
        "sample": node("SamplerCustomAdvanced", noise=["noise", 0], guider=["guider", 0],
                       sampler=["sampler", 0], sigmas=["first", 0],
                       latent_image=["encode", 0]),
        "decode": node("VAEDecode", samples=["sample", 0], vae=["vae", 0]),
        "invert": node("ImageInvert", image=["decode", 0])}


def test_the_lotus_workflow_returns_the_unets_one_step_prediction(engine: ModelEngine) -> None:
    result, _ = engine.run(probed(lotus_workflow(), "invert", "sample", "unet", "encode"))
    model = result.values["unet"][0][0]
    assert (model.family, model.sampling.prediction) == ("lotus", "img_to_img")
    latent = result.values["encode"][0][0].samples
    scale = model.latent_format.scale
    with torch.no_grad():  # x0 = F(x, t=999, null prompt, task): no input or output scaling
        expected = model.unet(latent * scale, torch.tensor([999.0]), lotus_null_prompt(),
                              lotus_task_embedding(CPU)) / scale
    got = result.values["sample"][0][0].samples
    assert torch.allclose(got, expected, atol=1e-4)
    assert tuple(result.values["invert"][0][0].shape) == (1, 32, 32, 3)


def test_the_img_to_img_rule_feeds_the_latent_as_is_and_returns_the_output(
        engine: ModelEngine) -> None:
    result, _ = engine.run(probed({"unet": lotus_workflow()["unet"]}, "unet"))
    sampling = result.values["unet"][0][0].sampling
    x, output, sigma = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.tensor([5.0])
    assert torch.equal(sampling.calculate_input(sigma, x), x)
    assert torch.equal(sampling.calculate_denoised(sigma, output, x), output)


def test_a_lotus_model_gets_the_task_embedding_and_no_extra_channels(
        engine: ModelEngine) -> None:
    result, _ = engine.run(probed({"unet": lotus_workflow()["unet"]}, "unet"))
    model = result.values["unet"][0][0]
    y = adm_vector(model, {}, "positive", torch.Size((1, 4, 4, 4)), CPU)
    assert torch.equal(y, lotus_task_embedding(CPU))
    inputs = SamplingInputs(torch.Size((1, 4, 4, 4)), torch.zeros(1, 4, 4, 4), None, CPU)
    assert concat_channels(model, {}, inputs) is None


def test_an_x4_checkpoint_saves_with_its_sd2_text_encoder_and_loads_back(
        engine: ModelEngine) -> None:
    result, _ = engine.run(probed({"ckpt": x4_workflow(0.0)["ckpt"]}, "ckpt"))
    model, clip, vae = (output[0] for output in result.values["ckpt"][:3])
    path = save_checkpoint(engine.base / "saved_x4.safetensors", model, clip, vae, {})
    layout = detect_checkpoint(load_file(str(path)))
    assert (layout.family, layout.prediction, layout.text_family) == ("sd_x4", "v", "sd2")
