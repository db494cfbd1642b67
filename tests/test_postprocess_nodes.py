"""Post-processing nodes: blend modes by their formulas, blur and sharpen against a direct
convolution with ComfyUI's kernel, quantisation, and morphology/Canny/YCbCr against kornia (the
library ComfyUI's nodes call; a test-only dependency)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from engine.context import NodeContext
from engine.image_filters import rgb_to_ycbcr, ycbcr_to_rgb
from nodes.postprocess import (
    Canny,
    ImageBlend,
    ImageBlur,
    ImageQuantize,
    ImageSharpen,
    Morphology,
    bayer_matrix,
)
from tests.node_testing import run_node


def constant(value: float, size: int = 5) -> torch.Tensor:
    return torch.full((1, size, size, 3), value)


@pytest.mark.parametrize(("mode", "expected"), [
    ("normal", 0.5), ("multiply", 0.125), ("screen", 0.625), ("overlay", 0.25),
    ("soft_light", 0.25), ("difference", 0.0)])  # difference: 0.25 - 0.5, clamped
def test_blend_modes_follow_their_formulas(ctx: NodeContext, mode: str, expected: float) -> None:
    (blended,) = run_node(ImageBlend, ctx, image1=constant(0.25), image2=constant(0.5),
                          blend_factor=1.0, blend_mode=mode)
    assert blended[0, 0, 0, 0].item() == pytest.approx(expected)


def test_blend_factor_mixes_towards_the_blend(ctx: NodeContext) -> None:
    (blended,) = run_node(ImageBlend, ctx, image1=constant(0.2), image2=constant(0.6),
                          blend_factor=0.25, blend_mode="normal")
    assert blended[0, 0, 0, 0].item() == pytest.approx(0.2 * 0.75 + 0.6 * 0.25)


def test_blend_fits_image2_to_image1(ctx: NodeContext) -> None:
    (blended,) = run_node(ImageBlend, ctx, image1=constant(0.2, 4), image2=constant(0.6, 8),
                          blend_factor=1.0, blend_mode="normal")
    assert blended.shape == (1, 4, 4, 3)


def comfy_kernel(radius: int, sigma: float) -> np.ndarray:
    """ComfyUI's blur kernel written out: a Gaussian of the distance on a -1..1 grid."""
    axis = np.linspace(-1, 1, 2 * radius + 1)
    weights = np.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / (2 * sigma * sigma))
    return weights / weights.sum()


def correlate_reflect(plane: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    radius = kernel.shape[0] // 2
    padded = np.pad(plane, radius, mode="reflect")
    out = np.zeros_like(plane)
    for row in range(plane.shape[0]):
        for col in range(plane.shape[1]):
            out[row, col] = (padded[row:row + kernel.shape[0], col:col + kernel.shape[1]]
                             * kernel).sum()
    return out


def test_blur_is_a_reflected_correlation_with_comfyuis_kernel(ctx: NodeContext) -> None:
    image = torch.rand(1, 6, 7, 3)
    (blurred,) = run_node(ImageBlur, ctx, image=image, blur_radius=2, sigma=0.7)
    expected = correlate_reflect(image[0, ..., 1].double().numpy(), comfy_kernel(2, 0.7))
    assert np.allclose(blurred[0, ..., 1].numpy(), expected, atol=1e-6)


def test_sharpen_leaves_flat_areas_alone_and_boosts_edges(ctx: NodeContext) -> None:
    (flat,) = run_node(ImageSharpen, ctx, image=constant(0.4), sharpen_radius=1, sigma=1.0,
                       alpha=1.0)
    assert torch.allclose(flat, constant(0.4), atol=1e-6)
    image = torch.rand(1, 6, 6, 3)
    (sharp,) = run_node(ImageSharpen, ctx, image=image, sharpen_radius=1, sigma=1.0, alpha=0.5)
    kernel = comfy_kernel(1, 1.0) * -5.0
    kernel[1, 1] += 1.0 - kernel.sum()
    expected = np.clip(correlate_reflect(image[0, ..., 0].double().numpy(), kernel), 0, 1)
    assert np.allclose(sharp[0, ..., 0].numpy(), expected, atol=1e-6)


def two_colour_image() -> torch.Tensor:
    image = torch.zeros(1, 4, 4, 3)
    image[:, :, 2:] = torch.tensor([1.0, 0.0, 0.0])
    return image


@pytest.mark.parametrize("dither", ["none", "floyd-steinberg", "bayer-4"])
def test_quantize_keeps_an_image_that_already_fits_the_palette(ctx: NodeContext,
                                                               dither: str) -> None:
    (quantized,) = run_node(ImageQuantize, ctx, image=two_colour_image(), colors=2,
                            dither=dither)
    assert torch.equal(quantized, two_colour_image())


def test_quantize_to_one_colour_gives_a_flat_image(ctx: NodeContext) -> None:
    (quantized,) = run_node(ImageQuantize, ctx, image=torch.rand(1, 4, 4, 3), colors=1,
                            dither="none")
    assert torch.unique(quantized.reshape(-1, 3), dim=0).shape[0] == 1


def test_bayer_matrix_holds_each_level_once_centred_on_zero() -> None:
    matrix = bayer_matrix(4)
    assert sorted((matrix * 16 + 7.5).round().astype(int).ravel().tolist()) == list(range(16))
    assert matrix.mean() == pytest.approx(0.0)


@pytest.fixture
def kornia() -> Any:
    return pytest.importorskip("kornia")


KORNIA_NAMES = {"erode": "erosion", "dilate": "dilation", "open": "opening", "close": "closing"}


@pytest.mark.parametrize("operation", ["erode", "dilate", "open", "close", "gradient",
                                       "bottom_hat", "top_hat"])
@pytest.mark.parametrize("size", [3, 4])
def test_morphology_matches_kornia(ctx: NodeContext, kornia: Any, operation: str,
                                   size: int) -> None:
    image = torch.rand(2, 9, 8, 3)
    (ours,) = run_node(Morphology, ctx, image=image, operation=operation, kernel_size=size)
    function = getattr(kornia.morphology, KORNIA_NAMES.get(operation, operation))
    reference = function(image.movedim(-1, 1), torch.ones(size, size))
    assert torch.allclose(ours, reference.movedim(1, -1), atol=1e-6)


def test_canny_matches_kornia_on_a_random_image(ctx: NodeContext, kornia: Any) -> None:
    generator = torch.Generator().manual_seed(3)
    image = torch.rand(2, 24, 20, 3, generator=generator)
    (ours,) = run_node(Canny, ctx, image=image, low_threshold=0.2, high_threshold=0.5)
    _, edges = kornia.filters.canny(image.movedim(-1, 1), 0.2, 0.5)
    assert torch.equal(ours, edges.repeat(1, 3, 1, 1).movedim(1, -1))


def test_canny_traces_a_step_edge_one_pixel_wide(ctx: NodeContext) -> None:
    image = torch.zeros(1, 16, 16, 3)
    image[:, :, 8:] = 1.0
    (edges,) = run_node(Canny, ctx, image=image, low_threshold=0.4, high_threshold=0.8)
    columns = edges[0, 4:12, :, 0].sum(dim=0)
    assert columns.nonzero().flatten().tolist() in ([7], [8]) and columns.max() == 8


def test_ycbcr_matches_kornia_and_round_trips(kornia: Any) -> None:
    rgb = torch.rand(2, 3, 5, 5)
    assert torch.allclose(rgb_to_ycbcr(rgb), kornia.color.rgb_to_ycbcr(rgb), atol=1e-6)
    ycbcr = rgb_to_ycbcr(rgb)
    assert torch.allclose(ycbcr_to_rgb(ycbcr), kornia.color.ycbcr_to_rgb(ycbcr), atol=1e-6)
    assert torch.allclose(ycbcr_to_rgb(ycbcr), rgb, atol=2e-3)  # the constants are rounded


def test_pure_red_in_ycbcr() -> None:
    ycbcr = rgb_to_ycbcr(torch.tensor([1.0, 0.0, 0.0]).reshape(1, 3, 1, 1)).flatten()
    assert ycbcr.tolist() == pytest.approx([0.299, 0.5 - 0.299 * 0.564, 0.5 + 0.701 * 0.713])
    assert not math.isnan(ycbcr.sum().item())
