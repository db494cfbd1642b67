"""Latent nodes: schemas match ComfyUI's, and each node behaves as ComfyUI's does."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from engine.context import InterruptFlag, NodeContext, Services
from engine.node import Node
from engine.paths import Paths
from engine.values import Latent
from nodes import latent as latent_nodes
from nodes.imaging import bislerp, slerp
from nodes.latent import (
    EmptyLatentImage,
    LatentBatch,
    LatentBlend,
    LatentComposite,
    LatentCrop,
    LatentFlip,
    LatentFromBatch,
    LatentRotate,
    LatentUpscale,
    LatentUpscaleBy,
    LoadLatent,
    RepeatLatentBatch,
    SaveLatent,
    SetLatentNoiseMask,
)
from tests.schema_parity import assert_matches_reference


@pytest.fixture
def ctx(tmp_path: Path) -> NodeContext:
    return NodeContext(node_id="1", class_type="Test", prompt_id="p",
                       services=Services(Paths.from_base(tmp_path)), interrupt=InterruptFlag())


def ramp_latent(batch: int = 2, channels: int = 4, height: int = 4, width: int = 6) -> Latent:
    count = batch * channels * height * width
    return Latent(torch.arange(count, dtype=torch.float32).reshape(batch, channels, height, width))


def snapshot(latent: Latent) -> dict[str, Any]:
    return {key: value.clone() if isinstance(value, torch.Tensor) else list(value)
            for key, value in latent.items()}


def assert_unchanged(latent: Latent, before: dict[str, Any]) -> None:
    assert set(latent) == set(before)
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(latent[key], value), key
        else:
            assert latent[key] == value, key


# -- schemas ------------------------------------------------------------------------------------

@pytest.mark.parametrize("node_type", latent_nodes.NODE_TYPES, ids=lambda n: n.schema.name)
def test_schema_matches_comfyui(node_type: type[Node]) -> None:
    assert_matches_reference(node_type)


# -- no node mutates its input --------------------------------------------------------------------

NODE_CALLS = [
    (LatentUpscale, {"upscale_method": "bislerp", "width": 96, "height": 64, "crop": "center"}),
    (LatentUpscaleBy, {"upscale_method": "bilinear", "scale_by": 2.0}),
    (LatentCrop, {"width": 64, "height": 64, "x": 8, "y": 0}),
    (LatentFlip, {"flip_method": "x-axis: vertically"}),
    (LatentRotate, {"rotation": "90 degrees"}),
    (LatentFromBatch, {"batch_index": 1, "length": 1}),
    (RepeatLatentBatch, {"amount": 3}),
    (SetLatentNoiseMask, {"mask": torch.ones(1, 32, 48)}),
]


@pytest.mark.parametrize(("node_type", "inputs"), NODE_CALLS,
                         ids=[node_type.schema.name for node_type, _ in NODE_CALLS])
def test_latent_nodes_leave_their_input_unchanged(ctx: NodeContext, node_type: type[Node],
                                                  inputs: dict[str, Any]) -> None:
    latent = ramp_latent().replace(noise_mask=torch.rand(2, 1, 4, 6), batch_index=[4, 5])
    before = snapshot(latent)
    (out,) = node_type().execute(ctx, samples=latent, **inputs)
    assert isinstance(out, Latent) and out is not latent
    assert out.samples.dtype == torch.float32
    assert_unchanged(latent, before)


def test_two_input_nodes_leave_their_inputs_unchanged(ctx: NodeContext) -> None:
    first, second = ramp_latent(), ramp_latent(height=2, width=2)
    before_first, before_second = snapshot(first), snapshot(second)
    LatentComposite().execute(ctx, samples_to=first, samples_from=second, x=8, y=8, feather=8)
    LatentBlend().execute(ctx, samples1=first, samples2=second, blend_factor=0.3)
    LatentBatch().execute(ctx, samples1=first, samples2=second)
    assert_unchanged(first, before_first)
    assert_unchanged(second, before_second)


# -- EmptyLatentImage, upscaling ------------------------------------------------------------------

def test_empty_latent_is_zeros_at_one_eighth_size(ctx: NodeContext) -> None:
    (latent,) = EmptyLatentImage().execute(ctx, width=512, height=264, batch_size=3)
    assert latent.samples.shape == (3, 4, 33, 64) and latent.samples.dtype == torch.float32
    assert not latent.samples.any() and set(latent) == {"samples"}


def test_latent_upscale_sizes_in_pixels_divided_by_8(ctx: NodeContext) -> None:
    (out,) = LatentUpscale().execute(ctx, samples=ramp_latent(), upscale_method="nearest-exact",
                                     width=128, height=72, crop="disabled")
    assert out.samples.shape == (2, 4, 9, 16)


def test_latent_upscale_zero_width_follows_aspect_and_minimum_64(ctx: NodeContext) -> None:
    (out,) = LatentUpscale().execute(ctx, samples=ramp_latent(height=4, width=6),
                                     upscale_method="area", width=0, height=16, crop="disabled")
    assert out.samples.shape == (2, 4, 8, 12)  # height raised to 64 px, width 96 px


def test_latent_upscale_by_scales_and_keeps_extra_fields(ctx: NodeContext) -> None:
    latent = ramp_latent().replace(batch_index=[3, 4])
    (out,) = LatentUpscaleBy().execute(ctx, samples=latent, upscale_method="bicubic",
                                       scale_by=1.5)
    assert out.samples.shape == (2, 4, 6, 9) and out.batch_index == [3, 4]


# -- bislerp --------------------------------------------------------------------------------------

def test_bislerp_at_scale_one_is_identity() -> None:
    samples = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(bislerp(samples, 7, 5), samples)


def test_bislerp_keeps_equal_neighbours_equal() -> None:
    vector = torch.tensor([0.3, -1.2, 0.7, 2.0])
    samples = vector.reshape(1, 4, 1, 1).expand(1, 4, 3, 3).clone()
    out = bislerp(samples, 7, 5)
    assert out.shape == (1, 4, 5, 7)
    assert torch.allclose(out, vector.reshape(1, 4, 1, 1).expand_as(out))


def test_bislerp_follows_the_arc_between_orthogonal_vectors() -> None:
    # Hand-checked: width 2 -> 4 samples the source at x = 0, 0.25, 0.75, 1 (edges clamped),
    # so unit vectors (1, 0) and (0, 1) give angles 0, pi/8, 3pi/8 and pi/2.
    samples = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)
    out = bislerp(samples, 4, 1)[0, :, 0].T
    angles = [0, math.pi / 8, 3 * math.pi / 8, math.pi / 2]
    expected = torch.tensor([[math.cos(a), math.sin(a)] for a in angles])
    assert torch.allclose(out, expected, atol=1e-6)


def test_slerp_interpolates_norms_linearly_and_lerps_opposites() -> None:
    start, end = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    middle = slerp(start, end, torch.tensor([[0.5]]))
    # Direction halfway along the arc (45 degrees), length halfway between 2 and 4.
    assert torch.allclose(middle, torch.tensor([[3.0, 3.0]]) / math.sqrt(2))
    opposite = slerp(torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]]),
                     torch.tensor([[0.25]]))
    assert torch.allclose(opposite, torch.tensor([[0.5, 0.0]]))


def test_latent_upscale_by_bislerp_changes_only_the_size(ctx: NodeContext) -> None:
    (out,) = LatentUpscaleBy().execute(ctx, samples=ramp_latent(), upscale_method="bislerp",
                                       scale_by=2.0)
    assert out.samples.shape == (2, 4, 8, 12)
    assert torch.allclose(out.samples[:, :, 0, 0], ramp_latent().samples[:, :, 0, 0])


# -- composite, blend, crop, flip, rotate -------------------------------------------------------

def test_latent_composite_pastes_at_the_latent_offset(ctx: NodeContext) -> None:
    target = Latent(torch.zeros(1, 4, 6, 6))
    source = Latent(torch.ones(1, 4, 2, 3))
    (out,) = LatentComposite().execute(ctx, samples_to=target, samples_from=source, x=16, y=8,
                                       feather=0)
    expected = torch.zeros(6, 6)
    expected[1:3, 2:5] = 1
    assert torch.equal(out.samples[0, 0], expected)


def test_latent_composite_clips_a_source_past_the_edge(ctx: NodeContext) -> None:
    (out,) = LatentComposite().execute(ctx, samples_to=Latent(torch.zeros(1, 4, 4, 4)),
                                       samples_from=Latent(torch.ones(1, 4, 4, 4)), x=16, y=24,
                                       feather=0)
    assert out.samples[0, 0].sum() == 2 and out.samples[0, 0, 3, 2:].tolist() == [1, 1]


def test_latent_composite_feathers_inner_edges(ctx: NodeContext) -> None:
    # Hand-checked: feather 16 px = 2 cells; the source sits at x = 1 cell inside a wider
    # target, so its left edge (not touching the border) ramps 1/2, 2/2; its right edge too.
    target = Latent(torch.zeros(1, 1, 1, 6))
    source = Latent(torch.ones(1, 1, 1, 4))
    (out,) = LatentComposite().execute(ctx, samples_to=target, samples_from=source, x=8, y=0,
                                       feather=16)
    assert out.samples[0, 0, 0].tolist() == [0, 0.5, 1, 1, 0.5, 0]


def test_latent_blend_weights_samples1_by_the_factor(ctx: NodeContext) -> None:
    first, second = Latent(torch.full((1, 4, 2, 2), 2.0)), Latent(torch.full((1, 4, 2, 2), 10.0))
    (out,) = LatentBlend().execute(ctx, samples1=first, samples2=second, blend_factor=0.25)
    assert torch.allclose(out.samples, torch.full((1, 4, 2, 2), 8.0))


def test_latent_crop_takes_the_window_in_cells(ctx: NodeContext) -> None:
    latent = ramp_latent(height=10, width=12)
    (out,) = LatentCrop().execute(ctx, samples=latent, width=64, height=72, x=16, y=8)
    assert torch.equal(out.samples, latent.samples[:, :, 1:10, 2:10])


def test_latent_flip_directions(ctx: NodeContext) -> None:
    latent = ramp_latent()
    (vertical,) = LatentFlip().execute(ctx, samples=latent, flip_method="x-axis: vertically")
    (horizontal,) = LatentFlip().execute(ctx, samples=latent, flip_method="y-axis: horizontally")
    assert torch.equal(vertical.samples, latent.samples.flip(2))
    assert torch.equal(horizontal.samples, latent.samples.flip(3))


def test_latent_rotate_90_degrees_is_clockwise(ctx: NodeContext) -> None:
    latent = Latent(torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2))
    (out,) = LatentRotate().execute(ctx, samples=latent, rotation="90 degrees")
    assert out.samples[0, 0].tolist() == [[3.0, 1.0], [4.0, 2.0]]
    (same,) = LatentRotate().execute(ctx, samples=latent, rotation="none")
    assert torch.equal(same.samples, latent.samples)


# -- batches and batch_index --------------------------------------------------------------------

def test_latent_from_batch_records_the_taken_indices(ctx: NodeContext) -> None:
    latent = ramp_latent(batch=4)
    (out,) = LatentFromBatch().execute(ctx, samples=latent, batch_index=1, length=2)
    assert torch.equal(out.samples, latent.samples[1:3]) and out.batch_index == [1, 2]


def test_latent_from_batch_clamps_and_keeps_existing_indices(ctx: NodeContext) -> None:
    latent = ramp_latent(batch=3).replace(batch_index=[7, 8, 9])
    (out,) = LatentFromBatch().execute(ctx, samples=latent, batch_index=10, length=5)
    assert out.samples.shape[0] == 1 and out.batch_index == [9]


def test_latent_from_batch_slices_a_per_sample_noise_mask(ctx: NodeContext) -> None:
    masks = torch.arange(2, dtype=torch.float32).reshape(2, 1, 1, 1).expand(2, 1, 4, 6)
    latent = ramp_latent(batch=4).replace(noise_mask=masks)
    (out,) = LatentFromBatch().execute(ctx, samples=latent, batch_index=2, length=2)
    assert out.noise_mask[:, 0, 0, 0].tolist() == [0.0, 1.0]


def test_repeat_latent_batch_offsets_batch_indices(ctx: NodeContext) -> None:
    latent = ramp_latent(batch=2).replace(batch_index=[2, 3])
    (out,) = RepeatLatentBatch().execute(ctx, samples=latent, amount=3)
    assert out.samples.shape[0] == 6 and torch.equal(out.samples[4:], latent.samples)
    assert out.batch_index == [2, 3, 4, 5, 6, 7]


def test_repeat_latent_batch_without_indices_adds_none(ctx: NodeContext) -> None:
    (out,) = RepeatLatentBatch().execute(ctx, samples=ramp_latent(batch=1), amount=2)
    assert out.samples.shape[0] == 2 and out.batch_index is None


def test_latent_batch_joins_and_indexes_each_part_from_zero(ctx: NodeContext) -> None:
    (out,) = LatentBatch().execute(ctx, samples1=ramp_latent(batch=2),
                                   samples2=ramp_latent(batch=1, height=8, width=8))
    assert out.samples.shape == (3, 4, 4, 6) and out.batch_index == [0, 1, 0]


def test_set_latent_noise_mask_reshapes_to_b1hw(ctx: NodeContext) -> None:
    (out,) = SetLatentNoiseMask().execute(ctx, samples=ramp_latent(), mask=torch.ones(2, 32, 48))
    assert out.noise_mask.shape == (2, 1, 32, 48)


# -- SaveLatent / LoadLatent ----------------------------------------------------------------------

def test_save_latent_writes_a_versioned_safetensors_file(ctx: NodeContext) -> None:
    prompt, extra = {"1": {"class_type": "SaveLatent"}}, {"workflow": {"nodes": []}}
    result = SaveLatent().execute(ctx, samples=ramp_latent(), filename_prefix="latents/ComfyUI",
                                  prompt=prompt, extra_pnginfo=extra)
    assert result.ui == {"latents": [{"filename": "ComfyUI_00001_.latent",
                                      "subfolder": "latents", "type": "output"}]}
    path = ctx.paths.output / "latents" / "ComfyUI_00001_.latent"
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == {"latent_tensor", "latent_format_version_0"}
        metadata = handle.metadata()
    assert json.loads(metadata["prompt"]) == prompt
    assert json.loads(metadata["workflow"]) == extra["workflow"]
    second = SaveLatent().execute(ctx, samples=ramp_latent(), filename_prefix="latents/ComfyUI")
    assert second.ui["latents"][0]["filename"] == "ComfyUI_00002_.latent"


def test_save_then_load_latent_round_trips(ctx: NodeContext) -> None:
    latent = ramp_latent()
    SaveLatent().execute(ctx, samples=latent, filename_prefix="trip")
    ctx.paths.input.mkdir(parents=True)
    (ctx.paths.output / "trip_00001_.latent").rename(ctx.paths.input / "trip.latent")
    assert LoadLatent.schema.input("latent").resolved_choices(ctx.services) == ["trip.latent"]
    (loaded,) = LoadLatent().execute(ctx, latent="trip.latent")
    assert torch.equal(loaded.samples, latent.samples) and loaded.samples.dtype == torch.float32


def test_load_latent_reads_an_annotated_output_file(ctx: NodeContext) -> None:
    SaveLatent().execute(ctx, samples=ramp_latent(), filename_prefix="made")
    (loaded,) = LoadLatent().execute(ctx, latent="made_00001_.latent [output]")
    assert loaded.samples.shape == (2, 4, 4, 6)


def test_load_latent_without_version_key_undoes_the_sd1_scale(ctx: NodeContext) -> None:
    ctx.paths.input.mkdir(parents=True)
    safetensors.torch.save_file({"latent_tensor": torch.full((1, 4, 2, 2), 0.18215)},
                                str(ctx.paths.input / "old.latent"))
    (loaded,) = LoadLatent().execute(ctx, latent="old.latent")
    assert torch.allclose(loaded.samples, torch.ones(1, 4, 2, 2))


def test_load_latent_missing_file_fails_validation(ctx: NodeContext) -> None:
    assert LoadLatent().validate(ctx, latent="x.latent") == ("latent",
                                                             "Invalid latent file: x.latent")
