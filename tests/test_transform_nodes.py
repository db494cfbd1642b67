"""Image geometry nodes: flips and turns, stitching, fitting, scaling rules and sizes, with the
expected pixels or sizes worked out by hand from ComfyUI's rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine.context import NodeContext
from nodes.transform import (
    GetImageSize,
    ImageFlip,
    ImageRotate,
    ImageScaleToMaxDimension,
    ImageScaleToTotalPixels,
    ImageStitch,
    ResizeAndPadImage,
    ResizeImageMaskNode,
)
from tests.node_testing import make_ctx, run_node


def numbered(height: int = 2, width: int = 3) -> torch.Tensor:
    """[1, H, W, 1] image whose pixels are 0, 1, 2 ... in reading order."""
    return torch.arange(float(height * width)).reshape(1, height, width, 1)


def test_flip_on_the_x_axis_turns_the_image_upside_down(ctx: NodeContext) -> None:
    (flipped,) = run_node(ImageFlip, ctx, image=numbered(), flip_method="x-axis: vertically")
    assert flipped[0, ..., 0].tolist() == [[3, 4, 5], [0, 1, 2]]


def test_flip_on_the_y_axis_mirrors_left_and_right(ctx: NodeContext) -> None:
    (flipped,) = run_node(ImageFlip, ctx, image=numbered(), flip_method="y-axis: horizontally")
    assert flipped[0, ..., 0].tolist() == [[2, 1, 0], [5, 4, 3]]


def test_rotate_90_degrees_is_clockwise(ctx: NodeContext) -> None:
    (turned,) = run_node(ImageRotate, ctx, image=numbered(), rotation="90 degrees")
    assert turned[0, ..., 0].tolist() == [[3, 0], [4, 1], [5, 2]]


def stitch(ctx: NodeContext, image1: torch.Tensor, image2: torch.Tensor | None,
           **options: Any) -> torch.Tensor:
    settings = {"direction": "right", "match_image_size": True, "spacing_width": 0,
                "spacing_color": "white", **options}
    (result,) = run_node(ImageStitch, ctx, image1=image1, image2=image2, **settings)
    return result


def test_stitch_without_image2_returns_image1(ctx: NodeContext) -> None:
    image = torch.rand(1, 2, 2, 3)
    assert stitch(ctx, image, None) is image


def test_stitch_right_scales_image2_to_image1s_height(ctx: NodeContext) -> None:
    result = stitch(ctx, torch.zeros(1, 2, 2, 3), torch.ones(1, 4, 8, 3))
    assert result.shape == (1, 2, 6, 3)  # image2 becomes 2 x 4
    assert torch.equal(result[:, :, 2:], torch.ones(1, 2, 4, 3))


def test_stitch_up_puts_image2_on_top_with_a_spacing_band(ctx: NodeContext) -> None:
    result = stitch(ctx, torch.zeros(1, 2, 2, 3), torch.ones(1, 2, 2, 3),
                    direction="up", spacing_width=1, spacing_color="red")
    assert result.shape == (1, 6, 2, 3)  # 2 + 2 (odd width made even) + 2
    assert result[0, 0, 0].tolist() == [1.0, 1.0, 1.0]
    assert result[0, 2, 0].tolist() == [1.0, 0.0, 0.0] and result[0, 5, 0].tolist() == [0, 0, 0]


def test_stitch_without_matching_centres_the_smaller_image(ctx: NodeContext) -> None:
    result = stitch(ctx, torch.zeros(1, 4, 2, 3), torch.zeros(1, 2, 2, 3),
                    match_image_size=False, spacing_color="white")
    assert result.shape == (1, 4, 4, 3)
    assert result[0, :, 2, 0].tolist() == [1.0, 0.0, 0.0, 1.0]


def test_stitch_repeats_the_last_image_of_the_shorter_batch(ctx: NodeContext) -> None:
    image2 = torch.stack([torch.zeros(2, 2, 3), torch.ones(2, 2, 3)])
    result = stitch(ctx, torch.zeros(3, 2, 2, 3), image2)
    assert result.shape[0] == 3 and torch.equal(result[2, :, 2:], torch.ones(2, 2, 3))


def test_resize_and_pad_fits_and_centres_on_the_padding_colour(ctx: NodeContext) -> None:
    (framed,) = run_node(ResizeAndPadImage, ctx, image=torch.zeros(1, 2, 4, 3), target_width=4,
                         target_height=4, padding_color="white", interpolation="nearest-exact")
    assert framed[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize(("steps", "size"), [(1, (145, 72)), (8, (144, 72))])
def test_scale_to_total_pixels(ctx: NodeContext, steps: int, size: tuple[int, int]) -> None:
    # 0.01 MP = 10485.76 pixels; 100 x 50 scales by sqrt(10485.76 / 5000) = 1.4481...
    (scaled,) = run_node(ImageScaleToTotalPixels, ctx, image=torch.rand(1, 50, 100, 3),
                         upscale_method="bilinear", megapixels=0.01, resolution_steps=steps)
    assert (scaled.shape[2], scaled.shape[1]) == size


def test_scale_to_max_dimension_keeps_the_aspect(ctx: NodeContext) -> None:
    (scaled,) = run_node(ImageScaleToMaxDimension, ctx, image=torch.rand(1, 50, 100, 3),
                         upscale_method="area", largest_size=20)
    assert scaled.shape == (1, 10, 20, 3)


def test_get_image_size(ctx: NodeContext) -> None:
    assert run_node(GetImageSize, ctx, image=torch.rand(3, 5, 7, 3)) == (7, 5, 3)


def test_get_image_size_shows_the_size_on_the_node_as_comfyui_does(tmp_path: Path) -> None:
    shown: list[tuple[str, str]] = []
    ctx = make_ctx(tmp_path, text_sink=lambda node_id, text: shown.append((node_id, text)))
    run_node(GetImageSize, ctx, image=torch.rand(3, 5, 7, 3))
    assert shown == [(ctx.node_id, "width: 7, height: 5\n batch size: 3")]


def resized(ctx: NodeContext, value: torch.Tensor, resize_type: str,
            **members: Any) -> torch.Tensor:
    inputs = {f"resize_type.{name}": member for name, member in members.items()}
    (result,) = run_node(ResizeImageMaskNode, ctx, input=value, resize_type=resize_type,
                         scale_method="nearest-exact", **inputs)
    return result


@pytest.mark.parametrize(("resize_type", "members", "size"), [
    ("scale by multiplier", {"multiplier": 0.5}, (4, 8)),
    ("scale dimensions", {"width": 6, "height": 0, "crop": "disabled"}, (3, 6)),
    ("scale longer dimension", {"longer_size": 4}, (2, 4)),
    ("scale shorter dimension", {"shorter_size": 4}, (4, 8)),
    ("scale width", {"width": 4}, (2, 4)),
    ("scale height", {"height": 2}, (2, 4)),
    ("scale total pixels", {"megapixels": 32 / 2**20}, (4, 8)),
    ("match size", {"match": torch.zeros(1, 3, 5), "crop": "center"}, (3, 5)),
])
def test_resize_image_mask_rules(ctx: NodeContext, resize_type: str, members: dict[str, Any],
                                 size: tuple[int, int]) -> None:
    image = resized(ctx, torch.rand(2, 8, 16, 3), resize_type, **members)
    assert image.shape == (2, *size, 3)


def test_resize_image_mask_keeps_a_mask_a_mask(ctx: NodeContext) -> None:
    mask = resized(ctx, torch.rand(1, 8, 16), "scale by multiplier", multiplier=2.0)
    assert mask.shape == (1, 16, 32)


def test_resize_image_mask_with_no_dimensions_changes_nothing(ctx: NodeContext) -> None:
    image = torch.rand(1, 4, 4, 3)
    assert resized(ctx, image, "scale dimensions", width=0, height=0, crop="center") is image
