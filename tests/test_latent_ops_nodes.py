"""Latent arithmetic, batch and operation nodes (ComfyUI's nodes_latent and nodes_rebatch),
with reference values worked out from the definitions."""

from __future__ import annotations

import pytest
import torch

from engine.context import NodeContext
from engine.diffusion.sampling.guidance import Guider
from engine.values import Latent
from nodes.latent_operations import (
    LatentApplyOperation,
    LatentApplyOperationCFG,
    LatentOperationSharpen,
    LatentOperationTonemapReinhard,
    apply_before_cfg,
)
from nodes.latent_ops import (
    BatchLatentsNode,
    LatentAdd,
    LatentBatchSeedBehavior,
    LatentConcat,
    LatentCut,
    LatentCutToBatch,
    LatentInterpolate,
    LatentMultiply,
    LatentSubtract,
    RebatchLatents,
)
from tests.diffusion.test_guidance import fake_model, inputs_for, prompt
from tests.node_testing import run_node


def filled(value: float, batch: int = 1, size: int = 2) -> Latent:
    return Latent(torch.full((batch, 4, size, size), value))


def test_add_and_subtract_keep_the_first_latents_fields(ctx: NodeContext) -> None:
    first = Latent(torch.full((1, 4, 2, 2), 3.0), batch_index=[5])
    (added,) = run_node(LatentAdd, ctx, samples1=first, samples2=filled(1.0))
    (taken,) = run_node(LatentSubtract, ctx, samples1=first, samples2=filled(1.0))
    assert torch.all(added.samples == 4.0) and torch.all(taken.samples == 2.0)
    assert added.batch_index == [5]


def test_add_fits_the_second_latent_to_the_first(ctx: NodeContext) -> None:
    (added,) = run_node(LatentAdd, ctx, samples1=filled(1.0, batch=3),
                        samples2=filled(2.0, size=4))
    assert added.samples.shape == (3, 4, 2, 2) and torch.all(added.samples == 3.0)


def test_multiply(ctx: NodeContext) -> None:
    (scaled,) = run_node(LatentMultiply, ctx, samples=filled(2.0), multiplier=-1.5)
    assert torch.all(scaled.samples == -3.0)


def vector_latent(*channels: float) -> Latent:
    return Latent(torch.tensor(channels, dtype=torch.float32).reshape(1, 4, 1, 1))


def test_interpolate_turns_the_direction_and_lerps_the_length(ctx: NodeContext) -> None:
    (mixed,) = run_node(LatentInterpolate, ctx, samples1=vector_latent(2, 0, 0, 0),
                        samples2=vector_latent(0, 4, 0, 0), ratio=0.5)
    half = 3.0 / 2 ** 0.5  # the 45-degree direction with length (2 + 4) / 2
    assert mixed.samples.flatten().tolist() == pytest.approx([half, half, 0, 0])


def test_interpolate_at_ratio_one_is_the_first_latent(ctx: NodeContext) -> None:
    first = Latent(torch.randn(2, 4, 3, 3))
    (mixed,) = run_node(LatentInterpolate, ctx, samples1=first,
                        samples2=Latent(torch.randn(2, 4, 3, 3)), ratio=1.0)
    assert torch.allclose(mixed.samples, first.samples, atol=1e-6)


@pytest.mark.parametrize(("dim", "order"), [("x", (1, 2)), ("-x", (2, 1))])
def test_concat_along_x(ctx: NodeContext, dim: str, order: tuple[int, int]) -> None:
    (joined,) = run_node(LatentConcat, ctx, samples1=filled(1.0), samples2=filled(2.0),
                         dim=dim)
    assert joined.samples.shape == (1, 4, 2, 4)
    assert joined.samples[0, 0, 0].tolist() == [order[0]] * 2 + [order[1]] * 2


def test_concat_along_t_of_an_image_latent_joins_channels(ctx: NodeContext) -> None:
    (joined,) = run_node(LatentConcat, ctx, samples1=filled(1.0), samples2=filled(2.0), dim="t")
    assert joined.samples.shape == (1, 8, 2, 2)


@pytest.mark.parametrize(("index", "amount", "columns"), [
    (1, 2, [1, 2]), (3, 9, [3, 4]), (-2, 5, [3, 4]), (-9, 1, [0])])
def test_cut_along_x(ctx: NodeContext, index: int, amount: int, columns: list[int]) -> None:
    latent = Latent(torch.arange(5.0).expand(1, 4, 1, 5).clone())
    (cut,) = run_node(LatentCut, ctx, samples=latent, dim="x", index=index, amount=amount)
    assert cut.samples[0, 0, 0].tolist() == columns


def test_cut_to_batch_makes_slices_batch_entries(ctx: NodeContext) -> None:
    latent = Latent(torch.arange(7.0).expand(1, 4, 2, 7).clone())
    (cut,) = run_node(LatentCutToBatch, ctx, samples=latent, dim="x", slice_size=2)
    assert cut.samples.shape == (3, 4, 2, 2)  # the seventh column is dropped
    assert cut.samples[:, 0, 0].tolist() == [[0, 1], [2, 3], [4, 5]]


def test_cut_to_batch_leaves_the_channel_axis_alone(ctx: NodeContext) -> None:
    latent = filled(1.0)
    (cut,) = run_node(LatentCutToBatch, ctx, samples=latent, dim="t", slice_size=2)
    assert cut is latent


def test_seed_behaviour_fixed_gives_every_entry_the_first_index(ctx: NodeContext) -> None:
    latent = Latent(torch.zeros(3, 4, 2, 2), batch_index=[4, 5, 6])
    (fixed,) = run_node(LatentBatchSeedBehavior, ctx, samples=latent, seed_behavior="fixed")
    (free,) = run_node(LatentBatchSeedBehavior, ctx, samples=latent, seed_behavior="random")
    assert fixed.batch_index == [4, 4, 4] and free.batch_index is None


def test_batch_latents_joins_indices(ctx: NodeContext) -> None:
    (batch,) = run_node(BatchLatentsNode, ctx, **{
        "latents.latent0": filled(0.0, batch=2),
        "latents.latent1": Latent(torch.ones(1, 4, 4, 4), batch_index=[7])})
    assert batch.samples.shape == (3, 4, 2, 2) and batch.batch_index == [0, 1, 7]


def test_rebatch_splits_runs_of_one_size(ctx: NodeContext) -> None:
    latents = [filled(0.0, batch=3), filled(1.0, batch=1), filled(2.0, batch=2, size=4)]
    (batches,) = run_node(RebatchLatents, ctx, latents=latents, batch_size=[2])
    assert [tuple(b.samples.shape[:1]) + tuple(b.samples.shape[2:]) for b in batches] == [
        (2, 2, 2), (2, 2, 2), (2, 4, 4)]
    assert [b.batch_index for b in batches] == [[0, 1], [2, 3], [4, 5]]
    assert all(b.noise_mask is None for b in batches)


def test_rebatch_keeps_real_noise_masks(ctx: NodeContext) -> None:
    masked = Latent(torch.zeros(2, 4, 2, 2), noise_mask=torch.zeros(1, 1, 16, 16))
    (batches,) = run_node(RebatchLatents, ctx, latents=[masked], batch_size=[4])
    assert batches[0].noise_mask.shape == (2, 1, 16, 16)


def test_tonemap_reinhard_compresses_lengths_towards_the_white_point(ctx: NodeContext) -> None:
    samples = torch.randn(1, 4, 6, 6)
    (operation,) = run_node(LatentOperationTonemapReinhard, ctx, multiplier=1.0)
    (mapped,) = run_node(LatentApplyOperation, ctx, samples=Latent(samples), operation=operation)
    length = samples.norm(dim=1, keepdim=True) + 1e-10
    top = length.std() * 5 + length.mean()
    expected = samples / length * (length / top / (length / top + 1) * top)
    assert torch.allclose(mapped.samples, expected, atol=1e-5)


def test_sharpen_with_zero_alpha_changes_nothing(ctx: NodeContext) -> None:
    samples = torch.randn(1, 4, 12, 12)
    (operation,) = run_node(LatentOperationSharpen, ctx, sharpen_radius=2, sigma=1.0, alpha=0.0)
    assert torch.allclose(operation(latent=samples), samples, atol=1e-5)


def test_apply_before_cfg_acts_on_the_guidance_difference() -> None:
    cond, uncond = torch.full((1, 4, 2, 2), 3.0), torch.full((1, 4, 2, 2), 1.0)
    doubled = apply_before_cfg(lambda latent: latent * 2, [cond, uncond])
    assert torch.all(doubled[0] == 5.0) and doubled[1] is uncond


def test_apply_operation_cfg_patches_the_models_pre_cfg_step(ctx: NodeContext) -> None:
    model, _ = fake_model()  # at x = 0, sigma = 1 a prompt of value v predicts x0 = -v
    (patched,) = run_node(LatentApplyOperationCFG, ctx, model=model,
                          operation=lambda latent: latent * 2)
    shape = (1, 4, 8, 8)
    guided = Guider(patched, [prompt(1)], [prompt(3)], 5.0).prepare(inputs_for(shape))
    result = guided(torch.zeros(shape), torch.ones(1))
    # cond x0 -1, uncond -3: cond' = 2 * (-1 + 3) - 3 = 1, then -3 + (1 + 3) * 5 = 17
    assert torch.allclose(result, torch.full(shape, 17.0))
    assert model.model_patches.sampler_pre_cfg_function == ()  # the input is not changed
