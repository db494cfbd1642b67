"""Image batch nodes: repeating, slicing, re-batching and joining image batches, seeded noise,
and the YUV (YCbCr) split and merge ComfyUI files under image/batch."""

from __future__ import annotations

from typing import Any

import torch

from engine.context import NodeContext
from engine.dynamic_inputs import Autogrow, GroupedInputsNode
from engine.image_filters import rgb_to_ycbcr, ycbcr_to_rgb
from engine.node import Float, Input, Int, Link, Node, NodeSchema, Output
from nodes.image import batch_images
from nodes.imaging import repeat_batch

SEED_MAX = 0xFFFFFFFFFFFFFFFF


def _batch_schema(name: str, inputs: tuple[Input, ...], outputs: tuple[Output, ...] | None = None,
                  category: str = "image/batch", **kw: Any) -> NodeSchema:
    return NodeSchema(name, inputs, (Output("IMAGE"),) if outputs is None else outputs,
                      category=category, comfy_v3=True, **kw)


class RepeatImageBatch(Node):
    schema = _batch_schema("RepeatImageBatch", (Link("image", "IMAGE"),
                                                Int("amount", 1, min=1, max=4096)))

    def execute(self, ctx: NodeContext, image: torch.Tensor, amount: int) -> tuple[torch.Tensor]:
        return (repeat_batch(image, amount),)


class ImageFromBatch(Node):
    """`length` images from `batch_index` on (both pulled inside the batch)."""

    schema = _batch_schema("ImageFromBatch", (Link("image", "IMAGE"),
                                              Int("batch_index", 0, min=0, max=4095),
                                              Int("length", 1, min=1, max=4096)))

    def execute(self, ctx: NodeContext, image: torch.Tensor, batch_index: int,
                length: int) -> tuple[torch.Tensor]:
        start = min(image.shape[0] - 1, batch_index)
        return (image[start:start + min(image.shape[0] - start, length)].clone(),)


class ImageAddNoise(Node):
    """Gaussian noise from a CPU generator seeded with `seed`, scaled by strength, clipped."""

    schema = _batch_schema(
        "ImageAddNoise",
        (Link("image", "IMAGE"),
         Int("seed", 0, min=0, max=SEED_MAX, options={"control_after_generate": True}),
         Float("strength", 0.5, min=0.0, max=1.0, step=0.01)), category="image")

    def execute(self, ctx: NodeContext, image: torch.Tensor, seed: int,
                strength: float) -> tuple[torch.Tensor]:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(image.shape, generator=generator).to(image)
        return ((image + strength * noise).clamp(0.0, 1.0),)


class ImageRGBToYUV(Node):
    """Y, U (Cb) and V (Cr) planes, each as a grey image."""

    schema = _batch_schema("ImageRGBToYUV", (Link("image", "IMAGE"),),
                           (Output("IMAGE", "Y"), Output("IMAGE", "U"), Output("IMAGE", "V")))

    def execute(self, ctx: NodeContext, image: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rgb = image[..., :3]
        planes = rgb_to_ycbcr(rgb.movedim(-1, 1)).movedim(1, -1)
        return tuple(planes[..., index:index + 1].expand_as(rgb) for index in range(3))


class ImageYUVToRGB(Node):
    """An RGB image from Y, U and V planes (each plane's channels averaged)."""

    schema = _batch_schema("ImageYUVToRGB", (Link("Y", "IMAGE"), Link("U", "IMAGE"),
                                             Link("V", "IMAGE")))

    def execute(self, ctx: NodeContext, Y: torch.Tensor, U: torch.Tensor,  # noqa: N803
                V: torch.Tensor) -> tuple[torch.Tensor]:  # noqa: N803
        planes = torch.cat([plane.mean(dim=-1, keepdim=True) for plane in (Y, U, V)], dim=-1)
        return (ycbcr_to_rgb(planes.movedim(-1, 1)).movedim(1, -1),)


class RebatchImages(Node):
    """Every image of every incoming batch, regrouped into batches of batch_size."""

    schema = _batch_schema("RebatchImages", (Link("images", "IMAGE"),
                                             Int("batch_size", 1, min=1, max=4096)),
                           (Output("IMAGE", is_list=True),), display_name="Rebatch Images",
                           input_is_list=True)

    def execute(self, ctx: NodeContext, images: list[torch.Tensor],
                batch_size: list[int]) -> tuple[list[torch.Tensor]]:
        size = batch_size[0]
        singles = [batch[index:index + 1] for batch in images for index in range(len(batch))]
        return ([torch.cat(singles[start:start + size]) for start in
                 range(0, len(singles), size)],)


class BatchImagesNode(GroupedInputsNode):
    schema = _batch_schema("BatchImagesNode",
                           (Autogrow("images", Link("image", "IMAGE"), "image", 2, 50),),
                           category="image", display_name="Batch Images")

    def run(self, ctx: NodeContext, images: dict[str, torch.Tensor]) -> tuple[torch.Tensor]:
        return (batch_images(list(images.values())),)


NODE_TYPES = (RepeatImageBatch, ImageFromBatch, ImageAddNoise, ImageRGBToYUV, ImageYUVToRGB,
              RebatchImages, BatchImagesNode)
