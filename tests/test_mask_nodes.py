"""Mask nodes behave as ComfyUI's nodes_mask does (reference values by hand, GrowMask against
scipy's grey morphology, which ComfyUI calls)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from engine.context import NodeContext
from nodes.mask import (
    BatchMasksNode,
    CropMask,
    FeatherMask,
    GrowMask,
    ImageColorToMask,
    ImageToMask,
    InvertMask,
    MaskComposite,
    MaskPreview,
    MaskToImage,
    SolidMask,
    ThresholdMask,
)
from tests.node_testing import run_node, run_ui


def test_mask_to_image_repeats_the_mask_in_three_channels(ctx: NodeContext) -> None:
    mask = torch.tensor([[0.0, 0.25], [0.5, 1.0]])
    (image,) = run_node(MaskToImage, ctx, mask=mask)
    assert image.shape == (1, 2, 2, 3)
    assert torch.equal(image[0, ..., 2], mask)


def test_image_to_mask_takes_one_channel(ctx: NodeContext) -> None:
    image = torch.rand(2, 3, 4, 4)
    (mask,) = run_node(ImageToMask, ctx, image=image, channel="green")
    assert torch.equal(mask, image[..., 1])


def test_image_to_mask_alpha_of_an_rgb_image_is_a_clear_error(ctx: NodeContext) -> None:
    with pytest.raises(ValueError, match="no alpha channel"):
        run_node(ImageToMask, ctx, image=torch.rand(1, 2, 2, 3), channel="alpha")


def test_image_color_to_mask_marks_exact_8bit_matches_with_one(ctx: NodeContext) -> None:
    image = torch.tensor([[[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [254.6 / 255, 0.001, 0.0]]]])
    (mask,) = run_node(ImageColorToMask, ctx, image=image, color=0xFF0000)
    assert mask.tolist() == [[[1.0, 0.0, 1.0]]]  # 254.6 rounds to 255, 0.255 rounds to 0


def test_solid_mask_is_one_mask_of_the_value(ctx: NodeContext) -> None:
    (mask,) = run_node(SolidMask, ctx, value=0.25, width=3, height=2)
    assert mask.shape == (1, 2, 3) and torch.all(mask == 0.25)


def test_invert_mask(ctx: NodeContext) -> None:
    (mask,) = run_node(InvertMask, ctx, mask=torch.tensor([[0.0, 0.75]]))
    assert mask.tolist() == [[1.0, 0.25]]


def test_crop_mask_cuts_a_window(ctx: NodeContext) -> None:
    mask = torch.arange(16.0).reshape(4, 4)
    (cropped,) = run_node(CropMask, ctx, mask=mask, x=1, y=2, width=2, height=5)
    assert cropped.tolist() == [[[9.0, 10.0], [13.0, 14.0]]]


ARITHMETIC = ([0.4, 0.6, 1.0], [0.4, 0.3, 1.0])
LOGIC = ([0.2, 0.6, 0.4], [0.0, 0.7, 0.7])  # rounded: [0, 1, 0] and [0, 1, 1]


@pytest.mark.parametrize(("operation", "masks", "expected"), [
    ("multiply", ARITHMETIC, [0.16, 0.18, 1.0]), ("add", ARITHMETIC, [0.8, 0.9, 1.0]),
    ("subtract", ARITHMETIC, [0.0, 0.3, 0.0]), ("and", LOGIC, [0.0, 1.0, 0.0]),
    ("or", LOGIC, [0.0, 1.0, 1.0]), ("xor", LOGIC, [0.0, 0.0, 1.0])])
def test_mask_composite_operations_are_clamped(ctx: NodeContext, operation: str,
                                               masks: tuple[list[float], list[float]],
                                               expected: list[float]) -> None:
    destination, source = (torch.tensor([[values]]) for values in masks)
    (result,) = run_node(MaskComposite, ctx, destination=destination, source=source, x=0, y=0,
                         operation=operation)
    assert result[0, 0].tolist() == pytest.approx(expected)


def test_mask_composite_places_the_source_at_the_offset(ctx: NodeContext) -> None:
    destination = torch.zeros(1, 3, 3)
    (result,) = run_node(MaskComposite, ctx, destination=destination,
                         source=torch.ones(1, 2, 2), x=2, y=1, operation="add")
    assert result[0].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 1]]


def test_mask_composite_past_the_edge_changes_nothing(ctx: NodeContext) -> None:
    destination = torch.full((1, 2, 2), 0.5)
    (result,) = run_node(MaskComposite, ctx, destination=destination,
                         source=torch.ones(1, 2, 2), x=5, y=0, operation="add")
    assert torch.equal(result, destination)


def test_feather_mask_ramps_the_left_edge(ctx: NodeContext) -> None:
    (mask,) = run_node(FeatherMask, ctx, mask=torch.ones(1, 1, 5), left=2, top=0, right=0,
                       bottom=0)
    assert mask[0, 0].tolist() == pytest.approx([0.5, 1, 1, 1, 1])


def test_feather_mask_right_ramp_starts_on_column_zero_as_in_comfyui(ctx: NodeContext) -> None:
    (mask,) = run_node(FeatherMask, ctx, mask=torch.ones(1, 1, 5), left=0, top=0, right=3,
                       bottom=0)
    assert mask[0, 0].tolist() == pytest.approx([1 / 3, 1, 1, 1, 2 / 3])


def dot_mask() -> torch.Tensor:
    mask = torch.zeros(1, 7, 7)
    mask[0, 3, 3] = 1.0
    mask[0, 1, 5] = 0.5
    return mask


@pytest.mark.parametrize("tapered", [True, False])
@pytest.mark.parametrize("expand", [2, -1])
def test_grow_mask_matches_scipy_grey_morphology(ctx: NodeContext, tapered: bool,
                                                 expand: int) -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    corner = 0 if tapered else 1
    footprint = [[corner, 1, corner], [1, 1, 1], [corner, 1, corner]]
    mask = dot_mask() if expand > 0 else 1.0 - dot_mask()
    expected = mask[0].numpy()
    for _ in range(abs(expand)):
        step = ndimage.grey_dilation if expand > 0 else ndimage.grey_erosion
        expected = step(expected, footprint=footprint)
    (grown,) = run_node(GrowMask, ctx, mask=mask, expand=expand, tapered_corners=tapered)
    assert torch.equal(grown[0], torch.from_numpy(expected))


def test_grow_mask_with_tapered_corners_grows_a_diamond(ctx: NodeContext) -> None:
    (grown,) = run_node(GrowMask, ctx, mask=dot_mask(), expand=1, tapered_corners=True)
    assert grown[0, 2:5, 2:5].tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]


def test_threshold_mask_is_strictly_above(ctx: NodeContext) -> None:
    (mask,) = run_node(ThresholdMask, ctx, mask=torch.tensor([0.2, 0.5, 0.7]), value=0.5)
    assert mask.tolist() == [0.0, 0.0, 1.0]


def test_mask_preview_writes_a_grey_png_to_temp(ctx: NodeContext) -> None:
    ui = run_ui(MaskPreview, ctx, mask=torch.full((1, 2, 3), 1.0))
    entry = ui["images"][0]
    assert entry["type"] == "temp" and entry["filename"].startswith("ComfyUI_temp_")
    with Image.open(ctx.paths.temp / entry["filename"]) as picture:
        assert picture.size == (3, 2) and picture.getpixel((0, 0)) == (255, 255, 255)


def test_batch_masks_resizes_later_masks_to_the_first(ctx: NodeContext) -> None:
    first, second = torch.zeros(1, 2, 2), torch.ones(2, 4, 4)
    (batch,) = run_node(BatchMasksNode, ctx, **{"masks.mask0": first, "masks.mask1": second})
    assert batch.shape == (3, 2, 2)
    assert torch.equal(batch[1:], torch.ones(2, 2, 2))
