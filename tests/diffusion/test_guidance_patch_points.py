"""Guidance's patch points (engine/diffusion/patches/model_patches.py): the model function
wrapper, pre-CFG / CFG / post-CFG functions and the denoise-mask function get ComfyUI's
arguments and their results are used; a clone's patches never reach the model it came from.

The stand-in UNet predicts eps = the mean of each sample's context tokens, so at x = 0 and
sigma = 1 a prompt of value v gives x0 = -v everywhere."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from engine.diffusion.networks.unet_patches import UNetCall
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.patches.model_patches import ModelPatches
from engine.diffusion.sampling.guidance import GuidedModel, Guider
from engine.diffusion.sampling.ksampler import sample
from engine.values import Latent
from tests.diffusion.test_guidance import RecordingUNet, fake_model, inputs_for, prompt

SHAPE = (1, 4, 8, 8)


class CallRecordingUNet(RecordingUNet):
    """The stand-in, also keeping each call's `call` (patch points and options)."""

    def __init__(self) -> None:
        super().__init__()
        self.unet_calls: list[UNetCall | None] = []

    def __call__(self, *args: Any, call: UNetCall | None = None, **kwargs: Any) -> Tensor:
        self.unet_calls.append(call)
        return super().__call__(*args, **kwargs)


def patched(change: Any, cfg: float = 5.0, **inputs: Any) -> tuple[GuidedModel, RecordingUNet]:
    model, _ = fake_model()
    unet = CallRecordingUNet()
    model = model.replace(unet=unet).patching(change)
    guidance = Guider(model, [prompt(1)], [prompt(3)], cfg).prepare(inputs_for(SHAPE, **inputs))
    return guidance, unet


def at_unit_sigma(guidance: GuidedModel) -> Tensor:
    return guidance(torch.zeros(SHAPE), torch.ones(1))


def test_model_function_wrapper_gets_apply_model_and_comfyui_args() -> None:
    seen: dict[str, Any] = {}

    def wrapper(apply_model: Any, args: dict[str, Any]) -> Tensor:
        seen.update(args)
        return apply_model(args["input"], args["timestep"], **args["c"]) * 2

    out = at_unit_sigma(patched(lambda p: p.with_model_function_wrapper(wrapper))[0])
    assert set(seen) == {"input", "timestep", "c", "cond_or_uncond"}
    assert seen["cond_or_uncond"] == [1, 0] and seen["input"].shape == (2, *SHAPE[1:])
    assert torch.equal(seen["timestep"], torch.ones(2))
    assert {"c_crossattn", "c_concat", "y", "control", "transformer_options"} <= set(seen["c"])
    assert torch.allclose(out, torch.full_like(out, 2 * (-3 + (-1 + 3) * 5.0)))


def test_sampler_cfg_function_gets_noise_predictions_and_returns_one() -> None:
    seen: dict[str, Any] = {}

    def cfg_function(args: dict[str, Any]) -> Tensor:
        seen.update(args)
        return args["cond"]  # guidance-free: the positive prediction alone

    guidance, _ = patched(lambda p: p.with_cfg_function(cfg_function))
    out = at_unit_sigma(guidance)
    x = torch.zeros(SHAPE)
    assert torch.allclose(seen["cond_denoised"], torch.full(SHAPE, -1.0))
    assert torch.allclose(seen["uncond_denoised"], torch.full(SHAPE, -3.0))
    assert torch.allclose(seen["cond"], x - seen["cond_denoised"])
    assert torch.allclose(seen["uncond"], x - seen["uncond_denoised"])
    assert seen["cond_scale"] == 5.0 and seen["model"] is guidance
    assert isinstance(seen["model_options"], ModelPatches)
    assert {"timestep", "sigma", "input"} <= set(seen)
    assert torch.allclose(out, torch.full(SHAPE, -1.0))


def test_pre_cfg_function_changes_the_predictions_cfg_mixes() -> None:
    seen: dict[str, Any] = {}

    def swap(args: dict[str, Any]) -> list[Tensor]:
        seen.update(args)
        cond, uncond = args["conds_out"]
        return [uncond, cond]

    out = at_unit_sigma(patched(lambda p: p.adding_pre_cfg(swap))[0])
    assert {"conds", "conds_out", "cond_scale", "timestep", "input", "sigma", "model",
            "model_options"} == set(seen)
    assert len(seen["conds"]) == 2
    assert torch.allclose(out, torch.full(SHAPE, -1 + (-3 + 1) * 5.0))


def test_post_cfg_functions_run_in_order_on_the_guided_result() -> None:
    seen: list[dict[str, Any]] = []

    def halve(args: dict[str, Any]) -> Tensor:
        seen.append(args)
        return args["denoised"] / 2

    out = at_unit_sigma(patched(lambda p: p.adding_post_cfg(halve).adding_post_cfg(halve))[0])
    guided = -3 + (-1 + 3) * 5.0
    assert torch.allclose(seen[0]["denoised"], torch.full(SHAPE, guided))
    assert torch.allclose(seen[1]["denoised"], torch.full(SHAPE, guided / 2))
    assert {"denoised", "cond", "uncond", "cond_scale", "model", "uncond_denoised",
            "cond_denoised", "sigma", "model_options", "input"} == set(seen[0])
    assert torch.allclose(out, torch.full(SHAPE, guided / 4))


def test_cfg_one_leaves_the_uncond_out_unless_a_patch_disables_that() -> None:
    seen: list[Tensor] = []

    def record(args: dict[str, Any]) -> Tensor:
        seen.append(args["uncond_denoised"])
        return args["denoised"]

    skipping, unet = patched(lambda p: p.adding_post_cfg(record), cfg=1.0)
    at_unit_sigma(skipping)
    assert unet.calls[0].x.shape[0] == 1 and torch.count_nonzero(seen[0]) == 0
    evaluating, unet = patched(lambda p: p.adding_post_cfg(record, disable_cfg1_optimization=True),
                               cfg=1.0)
    at_unit_sigma(evaluating)
    assert unet.calls[0].x.shape[0] == 2 and torch.allclose(seen[1], torch.full(SHAPE, -3.0))


def test_unet_call_options_carry_guidance_run_and_model_entries() -> None:
    guidance, unet = patched(lambda p: p.adding_unet_patch("middle_block_patch", lambda h, o: h)
                             .with_transformer_options(pack_setting=7))
    guidance = Guider(guidance.model, [prompt(1)], [prompt(3)], 5.0).prepare(
        dataclasses.replace(inputs_for(SHAPE), sigmas=torch.tensor([2.0, 1.0, 0.0])))
    at_unit_sigma(guidance)
    call = unet.unet_calls[0]  # type: ignore[attr-defined]
    assert call is not None and call.patches is guidance.model.model_patches.unet
    options = call.options
    assert options["cond_or_uncond"] == [1, 0] and options["pack_setting"] == 7
    assert torch.equal(options["sigmas"], torch.ones(2))
    assert torch.equal(options["sample_sigmas"], torch.tensor([2.0, 1.0, 0.0]))


def test_without_unet_patches_the_unet_gets_no_call() -> None:
    guidance, unet = patched(lambda p: p.adding_post_cfg(lambda args: args["denoised"]))
    at_unit_sigma(guidance)
    assert unet.unet_calls == [None]  # type: ignore[attr-defined]


def test_calc_cond_batch_runs_with_the_patches_it_is_given() -> None:
    guidance, unet = patched(lambda p: p)
    extra = ModelPatches().adding_unet_patch("middle_block_patch", lambda h, o: h)
    (cond,) = guidance.calc_cond_batch([guidance.positive], torch.zeros(SHAPE), torch.ones(1),
                                       extra)
    assert torch.allclose(cond, torch.full(SHAPE, -1.0))
    assert unet.unet_calls[-1].patches is extra.unet  # type: ignore[attr-defined,union-attr]


def test_denoise_mask_function_gets_sigma_mask_model_and_schedule_and_its_mask_is_used() -> None:
    seen: list[tuple[Tensor, Tensor, dict[str, Any]]] = []

    def keep_everything(sigma: Tensor, mask: Tensor, extra_options: dict[str, Any]) -> Tensor:
        seen.append((sigma, mask, extra_options))
        return torch.zeros_like(mask)

    model, _ = fake_model()
    model = model.patching(lambda p: p.with_denoise_mask_function(keep_everything))
    latent = Latent(torch.randn(SHAPE), noise_mask=torch.ones(1, 8, 8))
    out = sample(model, [prompt(1)], [prompt(3)], latent, seed=0, steps=3, cfg=5.0,
                 sampler_name="euler", scheduler="normal")
    assert len(seen) == 3 and seen[0][1].shape == SHAPE
    assert set(seen[0][2]) == {"model", "sigmas"} and len(seen[0][2]["sigmas"]) == 4
    assert seen[0][2]["model"].model_sampling is model.sampling
    assert torch.allclose(out.samples, latent.samples, atol=1e-5)  # a zero mask keeps it all


def test_a_patched_clone_leaves_the_original_model_unpatched() -> None:
    original, _ = fake_model()
    clone = original.patching(lambda p: p.adding_post_cfg(lambda args: args["denoised"] * 0)
                              .adding_unet_patch("input_block_patch", lambda h, o: h))
    assert original.model_patches.empty and not clone.model_patches.empty
    assert clone.unet is original.unet
    plain = at_unit_sigma(Guider(original, [prompt(1)], [prompt(3)], 5.0).prepare(
        inputs_for(SHAPE)))
    assert torch.allclose(plain, torch.full(SHAPE, -3 + (-1 + 3) * 5.0))


def test_patches_of_a_clone_of_a_clone_accumulate_without_reaching_the_first() -> None:
    first, _ = fake_model()
    second = first.patching(lambda p: p.adding_post_cfg(lambda args: args["denoised"]))
    third = second.patching(lambda p: p.adding_post_cfg(lambda args: args["denoised"]))
    assert [len(model.model_patches.sampler_post_cfg_function)
            for model in (first, second, third)] == [0, 1, 2]


def test_model_handle_carries_empty_patches_by_default() -> None:
    model, _ = fake_model()
    assert isinstance(model, ModelHandle) and model.model_patches.empty


def test_cfg_pp_uncond_comes_after_the_patches_as_comfyuis_post_cfg_hook_sees_it() -> None:
    """with_uncond (the CFG++ samplers) evaluates the uncond at cfg 1 even without a patch
    asking for it, runs the post-CFG functions on the guided x0 and returns the raw uncond."""
    def halve(args: dict[str, Any]) -> Tensor:
        return args["denoised"] / 2

    guidance, unet = patched(lambda p: p.adding_post_cfg(halve), cfg=1.0)
    guided, uncond = guidance.with_uncond(torch.zeros(SHAPE), torch.ones(1))
    assert unet.calls[0].x.shape[0] == 2
    assert torch.allclose(guided, torch.full(SHAPE, -1 / 2))  # cond -1, halved
    assert torch.allclose(uncond, torch.full(SHAPE, -3.0))
