"""Hooks (nodes/hooks.py, engine/diffusion/patches/hooks.py): scheduled LoRA / model-as-LoRA
weights that apply only while the conditioning entries carrying them are sampled, or while a
hooked CLIP encodes. References are the same weights applied the ordinary way (LoraLoader, the
other checkpoint itself) and keyframe schedules worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from engine.diffusion.patches.hooks import (
    HookGroup,
    HookKeyframe,
    HookKeyframes,
    KeyframeCursor,
    clip_schedule,
    interpolated,
    new_hook,
)
from nodes import hooks as nodes
from tests.diffusion.test_guidance import fake_model, guided, prompt
from tests.model_engine import ModelEngine, node, probed
from tests.test_lora_nodes import write_lora


@pytest.fixture
def engine(tmp_path: Path) -> ModelEngine:
    return ModelEngine(tmp_path)


# --- keyframes ----------------------------------------------------------------------------


def cursor(*frames: tuple[float, float, int], sigmas: tuple[float, ...]) -> KeyframeCursor:
    keyframes = tuple(HookKeyframe(strength, start, steps) for strength, start, steps in frames)
    return KeyframeCursor(keyframes, sigmas)


def test_keyframes_switch_once_their_start_sigma_is_reached() -> None:
    walk = cursor((1.0, 0.0, 1), (0.5, 0.5, 1), sigmas=(10.0, 4.0))
    assert [walk.strength_at(sigma) for sigma in (9.0, 6.0, 4.0, 2.0)] == [1.0, 1.0, 0.5, 0.5]


def test_a_keyframe_holds_for_its_guaranteed_steps() -> None:
    walk = cursor((1.0, 0.0, 3), (0.5, 0.1, 1), sigmas=(10.0, 9.0))
    assert [walk.strength_at(sigma) for sigma in (8.0, 7.0, 6.0, 5.0)] == [1.0, 1.0, 1.0, 0.5]


def test_keyframes_without_guaranteed_steps_are_passed_over_to_the_last_reached() -> None:
    walk = cursor((1.0, 0.0, 1), (0.7, 0.2, 0), (0.4, 0.3, 0), (0.1, 0.9, 0),
                  sigmas=(10.0, 8.0, 7.0, 1.0))
    assert walk.strength_at(9.0) == 1.0
    assert walk.strength_at(6.5) == 0.4  # past 0.7's and 0.4's starts, not 0.1's
    assert walk.strength_at(6.5) == 0.4  # the same sigma again: no step counted


def test_no_keyframes_means_full_strength() -> None:
    assert KeyframeCursor((), ()).strength_at(3.0) == 1.0


def test_keyframes_sort_by_start_keeping_the_order_of_equal_starts() -> None:
    frames = HookKeyframes().adding(HookKeyframe(1.0, 0.5), HookKeyframe(2.0, 0.0),
                                    HookKeyframe(3.0, 0.5))
    assert [frame.strength for frame in frames.keyframes] == [2.0, 1.0, 3.0]


@pytest.mark.parametrize("method", ["linear", "ease_in", "ease_out", "ease_in_out"])
def test_interpolated_strengths_follow_the_easing_curve(method: str) -> None:
    t = np.linspace(0, 1, 5)
    curve = {"linear": t, "ease_in": t**2, "ease_out": 1 - (1 - t) ** 2,
             "ease_in_out": (1 - np.cos(t * np.pi)) / 2}[method]
    assert np.allclose(interpolated(2.0, 0.0, 5, method), 2.0 - 2.0 * curve, atol=1e-6)


def test_clip_schedule_splits_the_run_where_any_hook_changes_strength() -> None:
    first = new_hook(1.0, 1.0).with_keyframes(HookKeyframes((HookKeyframe(0.0, 0.0),
                                                             HookKeyframe(1.0, 0.5))))
    second = new_hook(1.0, 1.0).with_keyframes(HookKeyframes((HookKeyframe(2.0, 0.25),)))
    schedule = clip_schedule(first.combined(second))
    ref_a, ref_b = first.hooks[0].ref, second.hooks[0].ref
    assert [span for span, _ in schedule] == [(0.0, 0.25), (0.25, 0.5), (0.5, 1.0)]
    assert [strengths[ref_a] for _, strengths in schedule] == [0.0, 0.0, 1.0]
    assert [strengths[ref_b] for _, strengths in schedule] == [1.0, 2.0, 2.0]


def test_hook_groups_keep_each_hook_once_and_keyframes_replace() -> None:
    group = new_hook(1.0, 1.0)
    assert group.combined(group) == group
    assert HookGroup.combine_all([None, None]) is None
    scheduled = group.with_keyframes(HookKeyframes((HookKeyframe(0.5),)))
    assert scheduled != group and scheduled.hooks[0].ref is group.hooks[0].ref
    assert group.combined(scheduled).hooks == group.hooks  # same ref: the first one stays


# --- conditioning nodes -------------------------------------------------------------------


def test_set_properties_adds_hooks_mask_and_range_to_every_entry() -> None:
    hooks, mask = new_hook(1.0, 0.0), torch.ones(8, 8)
    (out,) = nodes.ConditioningSetProperties().execute(
        None, [prompt(1), prompt(2)], strength=0.5, set_cond_area="mask bounds", mask=mask,
        hooks=hooks, timesteps=(0.2, 0.6))
    for _, options in out:
        assert options["hooks"] == hooks and options["mask"].shape == (1, 8, 8)
        assert options["mask_strength"] == 0.5 and options["set_area_to_bounds"] is True
        assert (options["start_percent"], options["end_percent"]) == (0.2, 0.6)


def test_hooks_added_to_hooked_entries_combine() -> None:
    first, second = new_hook(1.0, 0.0), new_hook(0.5, 0.0)
    (once,) = nodes.ConditioningSetProperties().execute(None, [prompt(1)], 1.0, "default",
                                                        hooks=first)
    (twice,) = nodes.ConditioningSetProperties().execute(None, once, 1.0, "default",
                                                         hooks=second)
    assert twice[0][1]["hooks"].hooks == first.hooks + second.hooks


def test_pair_and_default_combines_append_new_entries() -> None:
    positive, negative = nodes.PairConditioningCombine().execute(
        None, [prompt(1)], [prompt(2)], [prompt(3)], [prompt(4)])
    assert [p[0][0, 0, 0].item() for p in positive] == [1.0, 3.0]
    assert [p[0][0, 0, 0].item() for p in negative] == [2.0, 4.0]
    (combined,) = nodes.ConditioningSetDefaultCombine().execute(None, [prompt(1)], [prompt(5)])
    assert "default" not in combined[0][1] and combined[1][1]["default"] is True


def test_timesteps_range_gives_the_range_and_what_lies_before_and_after() -> None:
    assert nodes.ConditioningTimestepsRange().execute(None, 0.3, 0.8) == (
        (0.3, 0.8), (0.0, 0.3), (0.8, 1.0))


def test_keyframe_nodes_build_sorted_keyframes_with_one_guaranteed_step() -> None:
    (single,) = nodes.CreateHookKeyframe().execute(None, strength_mult=0.5, start_percent=0.4)
    (frames,) = nodes.CreateHookKeyframesInterpolated().execute(
        None, 1.0, 0.0, "linear", 0.0, 1.0, 3, False, prev_hook_kf=single)
    starts = [frame.start_percent for frame in frames.keyframes]
    assert starts == [0.0, 0.4, 0.5, 1.0]
    assert [frame.guarantee_steps for frame in frames.keyframes] == [1, 1, 0, 0]
    (floats,) = nodes.CreateHookKeyframesFromFloats().execute(None, [0.1, 0.2], 0.0, 0.5, False)
    assert [(f.start_percent, f.strength) for f in floats.keyframes] == [(0.0, pytest.approx(0.1)),
                                                                       (0.5, pytest.approx(0.2))]


def test_combine_hooks_skips_missing_inputs() -> None:
    first, second = new_hook(1.0, 0.0), new_hook(1.0, 0.0)
    (combined,) = nodes.CombineHooks4().execute(None, hooks_B=second, hooks_A=first)
    assert combined.hooks == first.hooks + second.hooks


# --- default entries in guidance ----------------------------------------------------------


def test_default_entries_fill_only_the_weight_other_entries_leave() -> None:
    model, _ = fake_model()
    left = torch.zeros(1, 8, 8)
    left[..., :4] = 1.0
    masked = prompt(1, mask=left)
    default = prompt(5, default=True)
    out = guided(model, [masked, default], None, 1.0)(torch.zeros(1, 4, 8, 8), torch.ones(1))
    assert torch.allclose(out[..., :4], torch.full_like(out[..., :4], -1.0))
    assert torch.allclose(out[..., 4:], torch.full_like(out[..., 4:], -5.0))


def test_default_entries_sit_out_when_the_others_cover_everything() -> None:
    model, unet = fake_model()
    out = guided(model, [prompt(1), prompt(5, default=True)], None, 1.0)(
        torch.zeros(1, 4, 8, 8), torch.ones(1))
    assert torch.allclose(out, torch.full_like(out, -1.0)) and len(unet.calls) == 1


# --- hooks in real sampling ---------------------------------------------------------------


def sample_api(ckpt: str, positive: list[Any], negative: list[Any],
               model: list[Any] | None = None) -> dict[str, Any]:
    return {"1": node("CheckpointLoaderSimple", ckpt_name=ckpt),
            "6": node("CLIPTextEncode", text="a red fox", clip=["1", 1]),
            "7": node("CLIPTextEncode", text="", clip=["1", 1]),
            "5": node("EmptyLatentImage", width=64, height=64, batch_size=1),
            "3": node("KSampler", model=model or ["1", 0], seed=3, steps=3, cfg=6.0,
                      sampler_name="euler", scheduler="normal", positive=positive,
                      negative=negative, latent_image=["5", 0], denoise=1.0)}


def samples(engine: ModelEngine, api: dict[str, Any], *extra: str) -> list[Tensor]:
    result, _ = engine.run(probed(api, "3", *extra))
    return [result.values[node_id][0][0] for node_id in ("3", *extra)]


def hooked_pair(hooks_node: dict[str, Any], api: dict[str, Any]) -> dict[str, Any]:
    api["20"] = hooks_node
    api["21"] = node("PairConditioningSetProperties", positive_NEW=["6", 0],
                     negative_NEW=["7", 0], strength=1.0, set_cond_area="default",
                     hooks=["20", 0])
    api["3"]["inputs"]["positive"], api["3"]["inputs"]["negative"] = ["21", 0], ["21", 1]
    return api


def test_a_lora_hook_on_both_prompts_samples_like_the_lora_loaded_on_the_model(
        engine: ModelEngine) -> None:
    ckpt, lora = engine.checkpoint("sd15"), write_lora(engine, "style.safetensors", 1)
    reference = sample_api(ckpt, ["6", 0], ["7", 0], model=["10", 0])
    reference["10"] = node("LoraLoaderModelOnly", model=["1", 0], lora_name=lora,
                           strength_model=0.8)
    hooked = hooked_pair(node("CreateHookLoraModelOnly", lora_name=lora, strength_model=0.8),
                         sample_api(ckpt, ["6", 0], ["7", 0]))
    plain = samples(engine, sample_api(ckpt, ["6", 0], ["7", 0]))[0]["samples"]
    expected = samples(engine, reference)[0]["samples"]
    got = samples(engine, hooked)[0]["samples"]
    assert torch.allclose(got, expected, atol=1e-5) and not torch.allclose(got, plain)


def test_a_hook_keyframed_to_zero_changes_nothing(engine: ModelEngine) -> None:
    ckpt, lora = engine.checkpoint("sd15"), write_lora(engine, "style.safetensors", 1)
    api = hooked_pair(node("SetHookKeyframes", hooks=["22", 0], hook_kf=["23", 0]),
                      sample_api(ckpt, ["6", 0], ["7", 0]))
    api["22"] = node("CreateHookLoraModelOnly", lora_name=lora, strength_model=1.0)
    api["23"] = node("CreateHookKeyframe", strength_mult=0.0, start_percent=0.0)
    plain = samples(engine, sample_api(ckpt, ["6", 0], ["7", 0]))[0]["samples"]
    assert torch.allclose(samples(engine, api)[0]["samples"], plain, atol=1e-6)


def test_a_model_as_lora_hook_samples_like_the_other_checkpoint(engine: ModelEngine) -> None:
    base, other = engine.checkpoint("sd15", "base.safetensors", seed=0), engine.checkpoint(
        "sd15", "other.safetensors", seed=7)
    reference = sample_api(base, ["6", 0], ["7", 0], model=["30", 0])
    reference["30"] = node("CheckpointLoaderSimple", ckpt_name=other)
    hooked = hooked_pair(node("CreateHookModelAsLoraModelOnly", ckpt_name=other,
                              strength_model=1.0), sample_api(base, ["6", 0], ["7", 0]))
    got = samples(engine, hooked)[0]["samples"]
    assert torch.allclose(got, samples(engine, reference)[0]["samples"], atol=1e-4)


def test_a_hook_on_the_positive_only_leaves_the_negative_pass_unhooked(
        engine: ModelEngine) -> None:
    ckpt, lora = engine.checkpoint("sd15"), write_lora(engine, "style.safetensors", 1)
    api = sample_api(ckpt, ["21", 0], ["7", 0])
    api["20"] = node("CreateHookLoraModelOnly", lora_name=lora, strength_model=1.0)
    api["21"] = node("ConditioningSetProperties", cond_NEW=["6", 0], strength=1.0,
                     set_cond_area="default", hooks=["20", 0])
    both = hooked_pair(node("CreateHookLoraModelOnly", lora_name=lora, strength_model=1.0),
                       sample_api(ckpt, ["6", 0], ["7", 0]))
    plain = samples(engine, sample_api(ckpt, ["6", 0], ["7", 0]))[0]["samples"]
    positive_only = samples(engine, api)[0]["samples"]
    assert not torch.allclose(positive_only, plain)
    assert not torch.allclose(positive_only, samples(engine, both)[0]["samples"])


def encoded(engine: ModelEngine, api: dict[str, Any], node_id: str) -> list[Any]:
    result, _ = engine.run(probed(api, node_id))
    return result.values[node_id][0][0]


def test_clip_hooks_encode_like_the_lora_loaded_on_the_clip(engine: ModelEngine) -> None:
    ckpt, lora = engine.checkpoint("sd15"), write_lora(engine, "style.safetensors", 1)
    api = {"1": node("CheckpointLoaderSimple", ckpt_name=ckpt),
           "10": node("LoraLoader", model=["1", 0], clip=["1", 1], lora_name=lora,
                      strength_model=0.0, strength_clip=0.7),
           "11": node("CLIPTextEncode", text="a red fox", clip=["10", 1]),
           "20": node("CreateHookLora", lora_name=lora, strength_model=0.0, strength_clip=0.7),
           "21": node("SetClipHooks", clip=["1", 1], apply_to_conds=True, schedule_clip=False,
                      hooks=["20", 0]),
           "22": node("CLIPTextEncode", text="a red fox", clip=["21", 0])}
    reference = encoded(engine, api, "11")
    hooked = encoded(engine, api, "22")
    assert len(hooked) == 1 and torch.allclose(hooked[0][0], reference[0][0], atol=1e-5)
    assert hooked[0][1]["hooks"].hooks[0].strength_clip == 0.7


def test_scheduled_clip_hooks_encode_each_keyframe_range(engine: ModelEngine) -> None:
    ckpt, lora = engine.checkpoint("sd15"), write_lora(engine, "style.safetensors", 1)
    api = {"1": node("CheckpointLoaderSimple", ckpt_name=ckpt),
           "11": node("CLIPTextEncode", text="a red fox", clip=["1", 1]),
           "12": node("LoraLoader", model=["1", 0], clip=["1", 1], lora_name=lora,
                      strength_model=0.0, strength_clip=1.0),
           "13": node("CLIPTextEncode", text="a red fox", clip=["12", 1]),
           "20": node("CreateHookLora", lora_name=lora, strength_model=0.0, strength_clip=1.0),
           "23": node("CreateHookKeyframe", strength_mult=0.0, start_percent=0.0),
           "24": node("CreateHookKeyframe", strength_mult=1.0, start_percent=0.5,
                      prev_hook_kf=["23", 0]),
           "25": node("SetHookKeyframes", hooks=["20", 0], hook_kf=["24", 0]),
           "21": node("SetClipHooks", clip=["1", 1], apply_to_conds=False, schedule_clip=True,
                      hooks=["25", 0]),
           "22": node("CLIPTextEncode", text="a red fox", clip=["21", 0])}
    plain, with_lora = encoded(engine, api, "11"), encoded(engine, api, "13")
    scheduled = encoded(engine, api, "22")
    assert [(e[1]["clip_start_percent"], e[1]["clip_end_percent"]) for e in scheduled] == [
        (0.0, 0.5), (0.5, 1.0)]
    assert torch.allclose(scheduled[0][0], plain[0][0], atol=1e-6)
    assert torch.allclose(scheduled[1][0], with_lora[0][0], atol=1e-5)
    assert "hooks" not in scheduled[0][1]


def test_scheduled_clip_entries_only_take_part_in_their_range() -> None:
    model, unet = fake_model()
    early = prompt(1, clip_start_percent=0.0, clip_end_percent=0.5)
    late = prompt(3, clip_start_percent=0.5, clip_end_percent=1.0)
    guidance = guided(model, [early, late], None, 1.0)
    sigma_max = float(model.sampling.sigma_max)
    at_start = guidance(torch.zeros(1, 4, 8, 8), torch.tensor([sigma_max]))
    at_end = guidance(torch.zeros(1, 4, 8, 8), torch.tensor([0.05]))
    assert torch.allclose(at_start, torch.full_like(at_start, -1.0 * sigma_max))
    assert math.isclose(float(at_end.mean()), -3.0 * 0.05, rel_tol=1e-5)
