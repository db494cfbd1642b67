"""EasyCache and LazyCache (nodes/step_cache.py, engine/diffusion/patches/step_cache.py): a
threshold of 0 changes nothing, a large one skips model calls only between the start and end
sigmas, skipped calls answer with each cond/uncond chunk's own cached change, and every
sampling run starts over. Model calls are counted by a wrapper around the node's wrapper;
the start/end sigmas are recomputed here from SD's scaled-linear schedule in numpy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from engine.diffusion.networks.unet import UNetFamily
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.patches.step_cache import StepCache
from engine.diffusion.sampling import sigmas_for
from engine.diffusion.sampling.ksampler import sample
from engine.values import Latent
from nodes.step_cache import EasyCache, LazyCache
from tests.diffusion.test_unet import tiny_unet
from tests.test_model_unet_patch_nodes import handle_for

NODES = [EasyCache, LazyCache]
STEPS = 10


def sd_sigma_at_percent(percent: float) -> float:
    """Sigma at timestep (1 - percent) * 999 of SD's scaled-linear schedule, log-interpolated."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    cumprod = np.cumprod(1.0 - betas)
    log_sigmas = np.log(((1 - cumprod) / cumprod) ** 0.5)
    t = (1.0 - percent) * 999.0
    low, weight = int(np.floor(t)), t - np.floor(t)
    high = min(low + 1, 999)
    return float(np.exp((1 - weight) * log_sigmas[low] + weight * log_sigmas[high]))


def counted(model: ModelHandle, calls: list[float]) -> ModelHandle:
    """`model` whose model function wrapper records the sigma of every real model call."""
    cache = model.model_patches.model_function_wrapper
    assert cache is not None

    def counting(apply_model: Any, args: dict[str, Any]) -> Tensor:
        def run(x: Tensor, t: Tensor, **c: Any) -> Tensor:
            calls.append(float(t[0]))
            return apply_model(x, t, **c)
        return cache(run, args)
    return model.patching(lambda p: p.with_model_function_wrapper(counting))


def cached(node: type, threshold: float, start: float = 0.15, end: float = 0.95
           ) -> tuple[ModelHandle, ModelHandle]:
    """(plain tiny SD1 model, the node's model)."""
    model = handle_for(tiny_unet(UNetFamily.SD1))
    (patched,) = node().execute(None, model, reuse_threshold=threshold, start_percent=start,
                                end_percent=end, verbose=False)
    return model, patched


def run(model: ModelHandle, cfg: float = 4.0) -> Tensor:
    context = torch.randn(1, 7, model.config.context_dim,
                          generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        return sample(model, [[context, {}]], [[context * 0.5, {}]],
                      Latent(torch.zeros(1, 4, 8, 8)), seed=3, steps=STEPS, cfg=cfg,
                      sampler_name="euler", scheduler="normal").samples


@pytest.mark.parametrize("node", NODES)
def test_threshold_zero_skips_nothing_and_matches_the_uncached_latent(node: type) -> None:
    plain, patched = cached(node, threshold=0.0)
    calls: list[float] = []
    out = run(counted(patched, calls))
    assert len(calls) == STEPS
    assert torch.equal(out, run(plain))


@pytest.mark.parametrize("node", NODES)
def test_large_threshold_skips_only_between_the_start_and_end_sigmas(node: type) -> None:
    _, patched = cached(node, threshold=3.0, start=0.2, end=0.9)
    calls: list[float] = []
    run(counted(patched, calls))
    start, end = sd_sigma_at_percent(0.2), sd_sigma_at_percent(0.9)
    wrapper = patched.model_patches.model_function_wrapper
    assert isinstance(wrapper, StepCache)
    assert wrapper.start_sigma == pytest.approx(start, rel=1e-4)
    assert wrapper.end_sigma == pytest.approx(end, rel=1e-4)
    schedule = sigmas_for(patched.sampling, "normal", STEPS)[:-1].tolist()
    outside = [s for s in schedule if not end < s <= start]
    assert outside and all(any(abs(c - s) < 1e-6 for c in calls) for s in outside)
    assert len(calls) < STEPS and wrapper.skipped_steps == STEPS - len(calls)


@pytest.mark.parametrize("node", NODES)
def test_each_sampling_run_starts_over(node: type) -> None:
    _, patched = cached(node, threshold=3.0)
    first = run(patched)
    assert torch.equal(run(patched), first)


def feed(cache: StepCache, layouts: list[tuple[int, ...]], sigmas: list[float],
         calls: list[tuple[float, tuple[int, ...]]]) -> list[tuple[Tensor, Tensor]]:
    """Drive `cache` as a sampler would: per sigma one call per layout, x drifting slowly;
    the stand-in model answers 0.9 x + 10 * side per chunk. Returns (x, answer) per call."""
    answers = []
    for step, sigma in enumerate(sigmas):
        for layout in layouts:
            x = torch.full((len(layout), 4, 16, 16), 1.0 + 0.01 * step)
            side = torch.tensor(layout, dtype=torch.float32).view(-1, 1, 1, 1)

            def model(x: Tensor, t: Tensor, layout: tuple[int, ...] = layout,
                      side: Tensor = side, **c: Any) -> Tensor:
                calls.append((float(t[0]), layout))
                return 0.9 * x + 10.0 * side
            args = {"input": x, "timestep": torch.full((len(layout),), sigma),
                    "c": {"transformer_options": {}}, "cond_or_uncond": list(layout)}
            answers.append((x, cache(model, args)))
    return answers


@pytest.mark.parametrize("whole_batch", [False, True])
def test_separate_cond_and_uncond_calls_skip_together_with_their_own_change(
        whole_batch: bool) -> None:
    cache = StepCache("EasyCache", 3.0, 100.0, 0.0, whole_batch)
    calls: list[tuple[float, tuple[int, ...]]] = []
    answers = feed(cache, [(1,), (0,)], [8.0, 7.0, 6.0, 5.0], calls)
    computed = {sigma for sigma, _ in calls}
    assert computed == {8.0, 7.0} and len(calls) == 4  # sigmas 6 and 5 skipped, both calls
    for (x, out), side in zip(answers[4:], [1.0, 0.0] * 2, strict=True):
        last_x = torch.full_like(x, 1.01)  # the last computed step's input
        assert torch.allclose(out, x + (0.9 * last_x + 10 * side - last_x))


def test_one_cond_uncond_batch_reuses_each_chunk_change() -> None:
    cache = StepCache("EasyCache", 3.0, 100.0, 0.0, whole_batch=False)
    calls: list[tuple[float, tuple[int, ...]]] = []
    answers = feed(cache, [(1, 0)], [8.0, 7.0, 6.0], calls)
    x, out = answers[-1]
    assert len(calls) == 2
    last_x = torch.full_like(x, 1.01)
    expected = x + 0.9 * last_x - last_x + torch.tensor([10.0, 0.0]).view(-1, 1, 1, 1)
    assert torch.allclose(out, expected)


def test_calls_below_the_end_sigma_always_run() -> None:
    cache = StepCache("EasyCache", 3.0, 100.0, 6.5, whole_batch=False)
    calls: list[tuple[float, tuple[int, ...]]] = []
    feed(cache, [(0,)], [8.0, 7.0, 6.0, 5.0, 4.0], calls)
    assert [sigma for sigma, _ in calls] == [8.0, 7.0, 6.0, 5.0, 4.0]


def test_calls_above_the_start_sigma_always_run() -> None:
    cache = StepCache("EasyCache", 3.0, 5.5, 0.0, whole_batch=False)
    calls: list[tuple[float, tuple[int, ...]]] = []
    feed(cache, [(0,)], [8.0, 7.0, 6.0, 5.0, 4.0, 3.0], calls)
    assert [sigma for sigma, _ in calls] == [8.0, 7.0, 6.0, 5.0, 4.0]
