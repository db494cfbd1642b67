"""Image batch nodes: repeat, slice, re-batch and join batches; seeded noise; YUV planes."""

from __future__ import annotations

import pytest
import torch

from engine.context import NodeContext
from nodes.image_batch import (
    BatchImagesNode,
    ImageAddNoise,
    ImageFromBatch,
    ImageRGBToYUV,
    ImageYUVToRGB,
    RebatchImages,
    RepeatImageBatch,
)
from tests.node_testing import run_node


def labelled(count: int) -> torch.Tensor:
    """A batch whose i-th image is filled with i."""
    return torch.arange(float(count)).reshape(count, 1, 1, 1).expand(count, 2, 2, 3).clone()


def labels(images: torch.Tensor) -> list[float]:
    return images[:, 0, 0, 0].tolist()


def test_repeat_image_batch_repeats_the_whole_batch(ctx: NodeContext) -> None:
    (images,) = run_node(RepeatImageBatch, ctx, image=labelled(2), amount=3)
    assert labels(images) == [0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize(("index", "length", "expected"), [
    (1, 2, [1, 2]), (3, 5, [3]), (9, 1, [3])])  # index and length pulled inside the batch
def test_image_from_batch(ctx: NodeContext, index: int, length: int,
                          expected: list[float]) -> None:
    (images,) = run_node(ImageFromBatch, ctx, image=labelled(4), batch_index=index,
                         length=length)
    assert labels(images) == expected


def test_add_noise_is_the_seeded_gaussian_scaled_and_clipped(ctx: NodeContext) -> None:
    image = torch.full((1, 3, 3, 3), 0.5)
    (noisy,) = run_node(ImageAddNoise, ctx, image=image, seed=42, strength=0.1)
    generator = torch.Generator().manual_seed(42)
    expected = (image + 0.1 * torch.randn(image.shape, generator=generator)).clamp(0, 1)
    assert torch.equal(noisy, expected)


def test_add_noise_accepts_the_largest_seed(ctx: NodeContext) -> None:
    (noisy,) = run_node(ImageAddNoise, ctx, image=torch.zeros(1, 2, 2, 3),
                        seed=0xFFFFFFFFFFFFFFFF, strength=0.5)
    assert noisy.shape == (1, 2, 2, 3)


def test_yuv_planes_are_grey_images_that_rebuild_the_colour(ctx: NodeContext) -> None:
    image = torch.rand(2, 4, 4, 3)
    planes = run_node(ImageRGBToYUV, ctx, image=image)
    assert all(plane.shape == image.shape for plane in planes)
    assert torch.equal(planes[0][..., 0], planes[0][..., 2])
    luma = 0.299 * image[..., 0] + 0.587 * image[..., 1] + 0.114 * image[..., 2]
    assert torch.allclose(planes[0][..., 0], luma)
    (rebuilt,) = run_node(ImageYUVToRGB, ctx, Y=planes[0], U=planes[1], V=planes[2])
    assert torch.allclose(rebuilt, image, atol=2e-3)  # kornia's rounded inverse constants


def test_rebatch_images_regroups_every_image(ctx: NodeContext) -> None:
    (batches,) = run_node(RebatchImages, ctx, images=[labelled(3), labelled(2) + 3],
                          batch_size=[2])
    assert [labels(batch) for batch in batches] == [[0, 1], [2, 3], [4]]


def test_batch_images_joins_and_fits_every_image_to_the_first(ctx: NodeContext) -> None:
    rgba = torch.ones(1, 4, 4, 4)
    (batch,) = run_node(BatchImagesNode, ctx, **{"images.image0": torch.zeros(1, 2, 2, 3),
                                                 "images.image1": labelled(2),
                                                 "images.image2": rgba})
    assert batch.shape == (4, 2, 2, 4)
    assert batch[0, 0, 0].tolist() == [0, 0, 0, 1]  # RGB images get opaque alpha
