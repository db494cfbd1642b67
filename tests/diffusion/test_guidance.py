"""Guidance and conditioning rules on a recording stand-in for the UNet.

The stand-in predicts eps = the mean of each sample's context tokens, so a prompt made of
tokens all equal to v predicts x0 = x - v * sigma; at x = 0, sigma = 1 that is -v everywhere,
which makes every weighting rule visible in plain numbers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor

from engine.diffusion.networks.unet import (
    ADM_NUMBER_DIM,
    UNetConfig,
    UNetFamily,
    sdxl_adm,
    sdxl_refiner_adm,
)
from engine.diffusion.patches.model_handle import SD1_LATENT, ModelHandle
from engine.diffusion.sampling import model_sampling
from engine.diffusion.sampling.conditioning import (
    BLANK_INPAINT_LATENT,
    ControlProvider,
    SamplingInputs,
    mask_bounds,
    prepare_entries,
    resolve_area,
)
from engine.diffusion.sampling.guidance import GuidedModel, Guider
from engine.diffusion.sampling.ksampler import sample
from engine.values import Latent

WIDTH = 8  # context width of the stand-in


@dataclass
class Call:
    x: Tensor
    timestep: Tensor
    context: Tensor
    y: Tensor | None
    down: list[Tensor] | None
    mid: Tensor | None


@dataclass
class RecordingUNet:
    """eps = mean of the sample's context tokens; every call recorded."""

    calls: list[Call] = field(default_factory=list)

    def __call__(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                 down_residuals: list[Tensor] | None = None, mid_residual: Tensor | None = None,
                 **extra: Any) -> Tensor:
        self.calls.append(Call(x.clone(), timesteps, context, y, down_residuals, mid_residual))
        value = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return value.expand(x.shape[0], 4, *x.shape[2:]).clone()


def fake_model(in_channels: int = 4, family: str = "sd1", adm: int | None = None
               ) -> tuple[ModelHandle, RecordingUNet]:
    config = dataclasses.replace(UNetConfig.tiny(UNetFamily.SD1), in_channels=in_channels,
                                 context_dim=WIDTH, adm_in_channels=adm)
    unet = RecordingUNet()
    handle = ModelHandle(unet, config, family, model_sampling("eps"), SD1_LATENT,  # type: ignore[arg-type]
                         torch.float32, torch.device("cpu"))
    return handle, unet


def prompt(value: float, tokens: int = 77, **options: Any) -> list[Any]:
    return [torch.full((1, tokens, WIDTH), float(value)), {"pooled_output": torch.ones(1, 32),
                                                          **options}]


def inputs_for(shape: tuple[int, ...], mask: Tensor | None = None,
               latent: Tensor | None = None) -> SamplingInputs:
    latent = torch.zeros(shape) if latent is None else latent
    return SamplingInputs(torch.Size(shape), latent, mask, torch.device("cpu"))


def guided(model: ModelHandle, positive: list[Any], negative: list[Any] | None, cfg: float,
           shape: tuple[int, ...] = (1, 4, 8, 8), **kw: Any) -> GuidedModel:
    return Guider(model, positive, negative, cfg).prepare(inputs_for(shape, **kw))


def x0_at_unit_sigma(guidance: GuidedModel, shape: tuple[int, ...] = (1, 4, 8, 8)) -> Tensor:
    return guidance(torch.zeros(shape), torch.ones(shape[0]))


def test_cond_and_uncond_run_in_one_batch_uncond_first() -> None:
    model, unet = fake_model()
    out = x0_at_unit_sigma(guided(model, [prompt(1)], [prompt(3)], cfg=5.0))
    assert len(unet.calls) == 1 and unet.calls[0].x.shape[0] == 2
    assert unet.calls[0].context[:, 0, 0].tolist() == [3.0, 1.0]
    assert torch.allclose(out, torch.full_like(out, -3 + (-1 + 3) * 5.0))


def test_cfg_one_skips_the_uncond_evaluation() -> None:
    model, unet = fake_model()
    out = x0_at_unit_sigma(guided(model, [prompt(1)], [prompt(3)], cfg=1.0))
    assert len(unet.calls) == 1 and unet.calls[0].x.shape[0] == 1
    assert torch.equal(out, torch.full_like(out, -1.0))


def test_combined_entries_are_averaged() -> None:
    model, unet = fake_model()
    out = x0_at_unit_sigma(guided(model, [prompt(1), prompt(3)], None, cfg=1.0))
    assert len(unet.calls) == 1 and torch.allclose(out, torch.full_like(out, -2.0))


def test_area_entry_gets_its_crop_and_weighs_only_its_region() -> None:
    model, unet = fake_model()
    shape = (1, 4, 16, 16)
    area = prompt(5, area=(8, 8, 0, 0), strength=1.0)
    out = x0_at_unit_sigma(guided(model, [prompt(1), area], None, 1.0, shape), shape)
    assert sorted(tuple(call.x.shape[2:]) for call in unet.calls) == [(8, 8), (16, 16)]
    assert out[0, 0, 12, 12] == -1.0  # outside the area: the full prompt alone
    assert out[0, 0, 0, 0] == -3.0  # inside: the average of both
    # the area's inner edges fade over min(8, 8 // 4) = 2 cells: the corner weighs 0.5 * 0.5
    assert torch.isclose(out[0, 0, 7, 7], torch.tensor((-1.0 - 5.0 * 0.25) / 1.25))


def test_area_strength_scales_its_weight() -> None:
    model, _ = fake_model()
    shape = (1, 4, 16, 16)
    area = prompt(5, area=(8, 8, 0, 0), strength=3.0)
    out = x0_at_unit_sigma(guided(model, [prompt(1), area], None, 1.0, shape), shape)
    assert torch.isclose(out[0, 0, 0, 0], torch.tensor((-1.0 - 15.0) / 4.0))


def test_uncond_gets_an_area_twin_with_its_own_text() -> None:
    model, _ = fake_model()
    guidance = guided(model, [prompt(1), prompt(5, area=(4, 4, 2, 2))], [prompt(3)], 7.0)
    assert guidance.negative is not None and len(guidance.negative) == 2
    twin = guidance.negative[1]
    assert twin.area == (4, 4, 2, 2) and float(twin.inputs.context[0, 0, 0]) == 3.0


def test_percentage_area_is_resolved_against_the_latent() -> None:
    assert resolve_area(("percentage", 0.5, 0.25, 0.5, 0.0), (16, 16)) == (8, 4, 8, 0)
    assert resolve_area(("percentage", 0.0, 0.0, 0.0, 0.0), (16, 16)) == (1, 1, 0, 0)


def test_mask_bounds_are_at_least_eight_cells() -> None:
    mask = torch.zeros(1, 16, 16)
    mask[0, 2:5, 3:13] = 1.0
    assert mask_bounds(mask) == (8, 10, 2, 3)
    assert mask_bounds(torch.zeros(1, 16, 16)) == (8, 8, 0, 0)


def test_mask_weights_its_entry_per_cell() -> None:
    model, _ = fake_model()
    mask = torch.zeros(1, 8, 8)
    mask[:, :, :4] = 1.0
    masked = prompt(5, mask=mask, mask_strength=1.0, set_area_to_bounds=False)
    out = x0_at_unit_sigma(guided(model, [prompt(1), masked], None, 1.0))
    assert torch.allclose(out[..., :4], torch.tensor(-3.0))
    assert torch.allclose(out[..., 4:], torch.tensor(-1.0))


def test_mask_is_resized_to_the_latent() -> None:
    model, _ = fake_model()
    mask = torch.ones(64, 64)
    entries = prepare_entries(model, [prompt(1, mask=mask)], "positive",
                              inputs_for((1, 4, 8, 8)))
    assert entries[0].mask is not None and entries[0].mask.shape == (1, 8, 8)


def test_timestep_range_limits_where_an_entry_is_used() -> None:
    model, unet = fake_model()
    late = prompt(5, start_percent=0.5, end_percent=1.0)
    guidance = guided(model, [prompt(1), late], None, 1.0)
    early_out = guidance(torch.zeros(1, 4, 8, 8), torch.tensor([14.0]))
    late_out = guidance(torch.zeros(1, 4, 8, 8), torch.tensor([0.1]))
    assert torch.allclose(early_out, torch.tensor(-14.0))  # only the full-range prompt
    assert torch.allclose(late_out, torch.tensor(-0.3))  # both: mean eps 3, sigma 0.1
    assert [call.x.shape[0] for call in unet.calls] == [1, 2]


def test_token_counts_within_4x_batch_by_repetition() -> None:
    model, unet = fake_model()
    x0_at_unit_sigma(guided(model, [prompt(1, tokens=77)], [prompt(3, tokens=154)], 2.0))
    assert len(unet.calls) == 1 and unet.calls[0].context.shape[1] == 154
    unet.calls.clear()
    x0_at_unit_sigma(guided(model, [prompt(1, tokens=77)], [prompt(3, tokens=385)], 2.0))
    assert sorted(call.context.shape[1] for call in unet.calls) == [77, 385]


@dataclass(eq=False)
class FakeControl:
    """A ControlProvider recording its calls and hooks."""

    seen: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)
    prepared: list[torch.Size] = field(default_factory=list)
    cleaned: int = 0

    def residuals(self, x_in: Tensor, timestep: Tensor, context: Tensor, y: Tensor | None,
                  sigma: Tensor) -> tuple[list[Tensor] | None, Tensor | None]:
        self.seen.append((x_in, timestep, sigma))
        return [torch.zeros(1)] * 3, torch.ones(1)

    def prepare(self, model: ModelHandle, latent_shape: torch.Size) -> None:
        self.prepared.append(latent_shape)

    def cleanup(self) -> None:
        self.cleaned += 1


def test_control_provider_feeds_the_unet_its_residuals() -> None:
    model, unet = fake_model()
    control = FakeControl()
    assert isinstance(control, ControlProvider)
    guidance = guided(model, [prompt(1, control=control)], [prompt(3, control=control)], 2.0)
    assert control.prepared == [torch.Size((1, 4, 8, 8))]  # once, though two entries carry it
    x = torch.randn(1, 4, 8, 8)
    guidance(x, torch.tensor([2.0]))
    x_in, timestep, sigma = control.seen[0]
    assert len(control.seen) == 1 and x_in.shape[0] == 2  # one batched call
    assert torch.allclose(x_in[0], x[0] / (2.0**2 + 1) ** 0.5) and sigma.tolist() == [2.0, 2.0]
    assert torch.equal(timestep, model.sampling.timestep(torch.tensor([2.0, 2.0])).float())
    assert unet.calls[0].down is not None and unet.calls[0].mid is not None
    guidance.cleanup()
    assert control.cleaned == 1


def test_different_controls_are_not_batched_together() -> None:
    model, unet = fake_model()
    x0_at_unit_sigma(guided(model, [prompt(1, control=FakeControl())], [prompt(3)], 2.0))
    assert len(unet.calls) == 2 and unet.calls[0].down is not None and unet.calls[1].down is None


def test_control_apply_to_uncond_lends_the_control_to_the_negative() -> None:
    model, _ = fake_model()
    control = FakeControl()
    positive = [prompt(1, control=control, control_apply_to_uncond=True)]
    guidance = guided(model, positive, [prompt(3)], 2.0)
    assert guidance.negative is not None and guidance.negative[0].control is control


def test_inpaint_unet_without_inputs_gets_ones_and_a_black_image() -> None:
    model, unet = fake_model(in_channels=9)
    x0_at_unit_sigma(guided(model, [prompt(1)], None, 1.0))
    extra = unet.calls[0].x[0, 4:]
    assert extra.shape == (5, 8, 8) and torch.equal(extra[0], torch.ones(8, 8))
    assert torch.allclose(extra[1:, 0, 0], torch.tensor(BLANK_INPAINT_LATENT))


def test_inpaint_unet_gets_the_conditioning_image_scaled_and_mask_rounded() -> None:
    model, unet = fake_model(in_channels=9)
    image = torch.full((1, 4, 8, 8), 2.0)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :, 32:] = 0.9
    options = {"concat_latent_image": image, "concat_mask": mask}
    x0_at_unit_sigma(guided(model, [prompt(1, **options)], None, 1.0))
    extra = unet.calls[0].x[0, 4:]
    assert torch.equal(extra[0, :, 4:], torch.ones(8, 4)) and extra[0, :, :4].sum() == 0
    assert torch.allclose(extra[1:], torch.tensor(2.0 * SD1_LATENT.scale))


def test_inpaint_unet_falls_back_to_the_noise_mask_and_latent() -> None:
    model, unet = fake_model(in_channels=9)
    latent = torch.full((1, 4, 8, 8), 0.5)
    noise_mask = torch.ones(1, 4, 8, 8)
    x0_at_unit_sigma(guided(model, [prompt(1)], None, 1.0, mask=noise_mask, latent=latent))
    extra = unet.calls[0].x[0, 4:]
    assert torch.equal(extra[0], torch.ones(8, 8)) and torch.equal(extra[1:], latent[0])


SDXL_ADM = 32 + 6 * ADM_NUMBER_DIM
REFINER_ADM = 32 + 5 * ADM_NUMBER_DIM


def test_sdxl_vector_defaults_to_the_latent_size() -> None:
    model, unet = fake_model(family="sdxl", adm=SDXL_ADM)
    x0_at_unit_sigma(guided(model, [prompt(1)], None, 1.0, (1, 4, 8, 12)), (1, 4, 8, 12))
    pooled = torch.ones(1, 32)
    expected = sdxl_adm(pooled, width=96, height=64, crop_w=0, crop_h=0, target_width=96,
                        target_height=64)
    assert torch.equal(unet.calls[0].y, expected)


def test_sdxl_vector_uses_the_prompt_sizes() -> None:
    model, unet = fake_model(family="sdxl", adm=SDXL_ADM)
    sizes = {"width": 1024, "height": 768, "crop_w": 8, "crop_h": 16, "target_width": 512,
             "target_height": 512}
    x0_at_unit_sigma(guided(model, [prompt(1, **sizes)], None, 1.0))
    assert torch.equal(unet.calls[0].y, sdxl_adm(torch.ones(1, 32), **sizes))


def test_refiner_aesthetic_score_defaults_differ_for_the_negative() -> None:
    model, unet = fake_model(family="sdxl_refiner", adm=REFINER_ADM)
    x0_at_unit_sigma(guided(model, [prompt(1)], [prompt(3)], 2.0))
    y = unet.calls[0].y
    common = {"width": 64, "height": 64, "crop_w": 0, "crop_h": 0}
    assert torch.equal(y[0], sdxl_refiner_adm(torch.ones(1, 32), aesthetic_score=2.5,
                                              **common)[0])
    assert torch.equal(y[1], sdxl_refiner_adm(torch.ones(1, 32), aesthetic_score=6.0,
                                              **common)[0])


def test_sdxl_prompt_without_pooled_output_is_a_clear_error() -> None:
    model, _ = fake_model(family="sdxl", adm=SDXL_ADM)
    with pytest.raises(ValueError, match="pooled_output"):
        guided(model, [[torch.zeros(1, 77, WIDTH), {}]], None, 1.0)


def test_ksampler_with_cfg_one_calls_the_model_once_per_step() -> None:
    model, unet = fake_model()
    latent = Latent(torch.zeros(1, 4, 8, 8))
    sample(model, [prompt(1)], [prompt(3)], latent, seed=0, steps=3, cfg=1.0,
           sampler_name="euler", scheduler="normal")
    assert [call.x.shape[0] for call in unet.calls] == [1, 1, 1]


def test_noise_mask_keeps_the_unmasked_latent() -> None:
    model, _ = fake_model()
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 5
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1.0
    out = sample(model, [prompt(1)], [prompt(3)], Latent(image, noise_mask=mask), seed=0,
                 steps=3, cfg=4.0, sampler_name="euler", scheduler="normal").samples
    assert torch.allclose(out[..., :4], image[..., :4], atol=1e-5)
    assert not torch.allclose(out[..., 4:], image[..., 4:], atol=1e-2)
