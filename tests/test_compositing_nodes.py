"""Compositing nodes: masked pastes of images and latents, Porter-Duff operators (values from
the operators' definitions on premultiplied colour), and alpha split/join."""

from __future__ import annotations

import pytest
import torch

from engine.context import NodeContext
from engine.values import Latent
from nodes.compositing import (
    PORTER_DUFF,
    ImageCompositeMasked,
    JoinImageWithAlpha,
    LatentCompositeMasked,
    PorterDuffImageComposite,
    SplitImageWithAlpha,
)
from tests.node_testing import run_node


def paste(ctx: NodeContext, destination: torch.Tensor, source: torch.Tensor, x: int = 0,
          y: int = 0, resize_source: bool = False, **extra: torch.Tensor) -> torch.Tensor:
    (result,) = run_node(ImageCompositeMasked, ctx, destination=destination, source=source,
                         x=x, y=y, resize_source=resize_source, **extra)
    return result


def test_image_composite_pastes_the_source_at_the_offset(ctx: NodeContext) -> None:
    result = paste(ctx, torch.zeros(1, 4, 4, 3), torch.ones(1, 2, 2, 3), x=1, y=2)
    assert result[0, ..., 0].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0]]


def test_image_composite_cuts_what_falls_outside(ctx: NodeContext) -> None:
    result = paste(ctx, torch.zeros(1, 3, 3, 3), torch.ones(1, 2, 2, 3), x=2, y=2)
    assert result[0, ..., 0].sum() == 1 and result[0, 2, 2, 0] == 1


def test_image_composite_blends_through_the_mask(ctx: NodeContext) -> None:
    result = paste(ctx, torch.zeros(1, 2, 2, 3), torch.ones(1, 2, 2, 3),
                   mask=torch.tensor([[0.25, 1.0], [0.0, 0.5]]))
    assert result[0, ..., 1].tolist() == [[0.25, 1.0], [0.0, 0.5]]


def test_image_composite_can_stretch_the_source_over_the_destination(ctx: NodeContext) -> None:
    result = paste(ctx, torch.zeros(1, 4, 4, 3), torch.ones(1, 1, 1, 3), resize_source=True)
    assert torch.equal(result, torch.ones(1, 4, 4, 3))


def test_image_composite_gives_an_rgb_source_opaque_alpha(ctx: NodeContext) -> None:
    result = paste(ctx, torch.zeros(1, 2, 2, 4), torch.full((1, 2, 2, 3), 0.5))
    assert result[0, 0, 0].tolist() == [0.5, 0.5, 0.5, 1.0]


def test_latent_composite_offsets_count_in_latent_cells(ctx: NodeContext) -> None:
    destination = Latent(torch.zeros(1, 4, 3, 3), batch_index=[7])
    (result,) = run_node(LatentCompositeMasked, ctx, destination=destination,
                         source=Latent(torch.ones(1, 4, 1, 1)), x=16, y=8, resize_source=False)
    assert result.samples[0, 0].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 0]]
    assert result.batch_index == [7]


def porter_duff_pixel(ctx: NodeContext, mode: str) -> tuple[list[float], float]:
    """White at alpha 0.5 (mask 0.5) over opaque 0.2 grey."""
    source, destination = torch.ones(1, 1, 1, 3), torch.full((1, 1, 1, 3), 0.2)
    image, mask = run_node(PorterDuffImageComposite, ctx, source=source,
                           source_alpha=torch.full((1, 1, 1), 0.5), destination=destination,
                           destination_alpha=torch.zeros(1, 1, 1), mode=mode)
    return image[0, 0, 0].tolist(), mask[0, 0, 0].item()


@pytest.mark.parametrize(("mode", "colour", "mask"), [
    ("SRC_OVER", 0.6, 0.0),   # (1*0.5 + 0.2*1*(1-0.5)) / 1
    ("DST_OVER", 0.2, 0.0),   # the opaque destination covers everything
    ("SRC", 1.0, 0.5),        # the source alone, half transparent
    ("DST", 0.2, 0.0),
    ("SRC_IN", 1.0, 0.5),     # source inside the opaque destination
    ("DST_OUT", 0.2, 0.5),    # destination where the source is not: alpha 1 - 0.5
    ("CLEAR", 0.0, 1.0),
    ("MULTIPLY", 0.2, 0.5),   # (0.5 * 0.2) / (0.5 * 1)
])
def test_porter_duff_operators(ctx: NodeContext, mode: str, colour: float, mask: float) -> None:
    image, alpha_mask = porter_duff_pixel(ctx, mode)
    assert image == pytest.approx([colour] * 3) and alpha_mask == pytest.approx(mask)


def test_porter_duff_offers_comfyuis_eighteen_modes() -> None:
    assert len(PORTER_DUFF) == 18 and list(PORTER_DUFF) == sorted(PORTER_DUFF)


def test_porter_duff_fits_the_source_to_the_destination(ctx: NodeContext) -> None:
    image, mask = run_node(PorterDuffImageComposite, ctx, source=torch.ones(1, 2, 2, 3),
                           source_alpha=torch.zeros(1, 2, 2),
                           destination=torch.zeros(1, 4, 4, 3),
                           destination_alpha=torch.zeros(1, 4, 4), mode="SRC")
    assert image.shape == (1, 4, 4, 3) and mask.shape == (1, 4, 4)


def test_split_then_join_alpha_round_trips(ctx: NodeContext) -> None:
    rgba = torch.rand(2, 3, 3, 4)
    rgb, mask = run_node(SplitImageWithAlpha, ctx, image=rgba)
    assert torch.allclose(mask, 1.0 - rgba[..., 3])
    (joined,) = run_node(JoinImageWithAlpha, ctx, image=rgb, alpha=mask)
    assert torch.allclose(joined, rgba)


def test_split_of_an_rgb_image_gives_an_empty_mask(ctx: NodeContext) -> None:
    _, mask = run_node(SplitImageWithAlpha, ctx, image=torch.rand(1, 2, 2, 3))
    assert torch.equal(mask, torch.zeros(1, 2, 2))


def test_join_resizes_the_mask_to_the_image(ctx: NodeContext) -> None:
    (joined,) = run_node(JoinImageWithAlpha, ctx, image=torch.rand(1, 4, 4, 3),
                         alpha=torch.zeros(1, 2, 2))
    assert joined.shape == (1, 4, 4, 4) and torch.equal(joined[..., 3], torch.ones(1, 4, 4))
