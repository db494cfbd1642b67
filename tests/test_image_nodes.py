"""Image nodes: schemas match ComfyUI's, and each node behaves as ComfyUI's does."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.context import NodeContext
from engine.executor import Executor
from engine.node import Node, NodeResult
from engine.paths import PathError, split_annotation
from engine.registry import NodeRegistry
from engine.validation import validate_prompt
from nodes import image as image_nodes
from nodes import imageio
from nodes.filenames import expand_prefix, format_date, next_counter
from nodes.image import (
    EmptyImage,
    ImageBatch,
    ImageCrop,
    ImageInvert,
    ImagePadForOutpaint,
    ImageScale,
    ImageScaleBy,
)
from nodes.imageio import LoadImage, LoadImageMask, PreviewImage, SaveImage
from nodes.imaging import IMAGE_UPSCALE_METHODS, resize
from tests.node_testing import make_ctx
from tests.schema_parity import assert_matches_reference

ALL_IMAGE_NODES = image_nodes.NODE_TYPES + imageio.NODE_TYPES


@pytest.fixture
def ctx(tmp_path: Path) -> NodeContext:
    return make_ctx(tmp_path)


def ramp_image(batch: int = 1, height: int = 4, width: int = 6, channels: int = 3) -> torch.Tensor:
    count = batch * height * width * channels
    return (torch.arange(count, dtype=torch.float32) / count).reshape(batch, height, width,
                                                                      channels)


def write_input(ctx: NodeContext, name: str, image: Image.Image, **save_args: object) -> Path:
    ctx.paths.input.mkdir(parents=True, exist_ok=True)
    path = ctx.paths.input / name
    image.save(path, **save_args)
    return path


# -- schemas ------------------------------------------------------------------------------------

@pytest.mark.parametrize("node_type", ALL_IMAGE_NODES, ids=lambda n: n.schema.name)
def test_schema_matches_comfyui(node_type: type[Node]) -> None:
    assert_matches_reference(node_type)


# -- EmptyImage, ImageInvert, ImageCrop, ImageBatch -----------------------------------------------

def test_empty_image_fills_the_rgb_colour(ctx: NodeContext) -> None:
    (image,) = EmptyImage().execute(ctx, width=5, height=3, batch_size=2, color=0xFF8000)
    assert image.shape == (2, 3, 5, 3) and image.dtype == torch.float32
    assert torch.allclose(image[1, 2, 4], torch.tensor([1.0, 128 / 255, 0.0]))


def test_image_invert_gives_one_minus_pixels_and_keeps_input(ctx: NodeContext) -> None:
    image = ramp_image()
    before = image.clone()
    (inverted,) = ImageInvert().execute(ctx, image=image)
    assert torch.allclose(inverted, 1.0 - before)
    assert torch.equal(image, before)


def test_image_crop_takes_the_window_and_pulls_offsets_inside(ctx: NodeContext) -> None:
    image = ramp_image(height=4, width=6)
    (crop,) = ImageCrop().execute(ctx, image=image, width=2, height=3, x=1, y=1)
    assert torch.equal(crop, image[:, 1:4, 1:3])
    (edge,) = ImageCrop().execute(ctx, image=image, width=4, height=4, x=100, y=100)
    assert torch.equal(edge, image[:, 3:, 5:])


def test_image_batch_resizes_the_second_image_to_the_first(ctx: NodeContext) -> None:
    first, second = ramp_image(height=4, width=6), ramp_image(batch=2, height=8, width=8)
    (batch,) = ImageBatch().execute(ctx, image1=first, image2=second)
    assert batch.shape == (3, 4, 6, 3)
    assert torch.equal(batch[0], first[0])


def test_image_batch_adds_opaque_alpha_to_rgb(ctx: NodeContext) -> None:
    (batch,) = ImageBatch().execute(ctx, image1=ramp_image(channels=4), image2=ramp_image())
    assert batch.shape == (2, 4, 6, 4)
    assert torch.all(batch[1, ..., 3] == 1.0)


# -- scaling ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", IMAGE_UPSCALE_METHODS)
def test_image_scale_gives_the_requested_size_with_every_method(ctx: NodeContext,
                                                                method: str) -> None:
    image = ramp_image()
    before = image.clone()
    (scaled,) = ImageScale().execute(ctx, image=image, upscale_method=method, width=9, height=7,
                                     crop="disabled")
    assert scaled.shape == (1, 7, 9, 3) and scaled.dtype == torch.float32
    assert torch.equal(image, before)


def test_image_scale_with_zero_width_keeps_the_aspect_ratio(ctx: NodeContext) -> None:
    (scaled,) = ImageScale().execute(ctx, image=ramp_image(height=4, width=6),
                                     upscale_method="bilinear", width=0, height=8, crop="disabled")
    assert scaled.shape == (1, 8, 12, 3)


def test_image_scale_with_zero_size_returns_the_image(ctx: NodeContext) -> None:
    image = ramp_image()
    (scaled,) = ImageScale().execute(ctx, image=image, upscale_method="area", width=0, height=0,
                                     crop="disabled")
    assert scaled is image


def test_image_scale_center_crop_cuts_the_sides_before_resizing(ctx: NodeContext) -> None:
    image = ramp_image(height=4, width=8)
    (scaled,) = ImageScale().execute(ctx, image=image, upscale_method="nearest-exact", width=4,
                                     height=4, crop="center")
    assert torch.equal(scaled, image[:, :, 2:6])


def test_lanczos_of_constant_image_stays_constant() -> None:
    image = torch.full((1, 3, 5, 5), 100 / 255)
    assert torch.allclose(resize(image, 9, 3, "lanczos"), image[:, :, :3, :1].expand(1, 3, 3, 9))


def test_image_scale_by_rounds_the_new_size(ctx: NodeContext) -> None:
    (scaled,) = ImageScaleBy().execute(ctx, image=ramp_image(height=4, width=6),
                                       upscale_method="bicubic", scale_by=1.5)
    assert scaled.shape == (1, 6, 9, 3)


# -- ImagePadForOutpaint ------------------------------------------------------------------------

def test_pad_for_outpaint_pads_with_grey_and_keeps_the_image(ctx: NodeContext) -> None:
    image = ramp_image(height=6, width=6)
    padded, mask = ImagePadForOutpaint().execute(ctx, image=image, left=2, top=1, right=0,
                                                 bottom=3, feathering=0)
    assert padded.shape == (1, 10, 8, 3) and mask.shape == (1, 10, 8)
    assert torch.equal(padded[:, 1:7, 2:8], image)
    assert torch.all(padded[:, 0] == 0.5) and torch.all(padded[:, :, :2] == 0.5)
    assert torch.all(mask[0, 1:7, 2:8] == 0) and mask.sum() == 10 * 8 - 36


def test_pad_for_outpaint_feathers_the_mask_quadratically(ctx: NodeContext) -> None:
    # Hand-checked: padded on the left only, feathering 2: column j of the image is
    # d = j pixels from the seam, weight ((2 - d) / 2)^2 = 1, 0.25, 0, 0, ...
    _, mask = ImagePadForOutpaint().execute(ctx, image=ramp_image(height=6, width=6), left=2,
                                            top=0, right=0, bottom=0, feathering=2)
    expected_row = torch.tensor([1, 1, 1, 0.25, 0, 0, 0, 0])
    assert torch.equal(mask[0], expected_row.expand(6, 8))


def test_pad_for_outpaint_skips_feathering_wider_than_half_the_image(ctx: NodeContext) -> None:
    _, mask = ImagePadForOutpaint().execute(ctx, image=ramp_image(height=6, width=6), left=2,
                                            top=0, right=0, bottom=0, feathering=3)
    assert torch.all(mask[0, :, 2:] == 0)


# -- SaveImage / PreviewImage -------------------------------------------------------------------

PROMPT = {"9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI"}}}
EXTRA = {"workflow": {"nodes": [], "links": [], "version": 0.4}}


def test_save_image_writes_png_with_prompt_and_workflow_chunks(ctx: NodeContext) -> None:
    result = SaveImage().execute(ctx, images=ramp_image(), filename_prefix="ComfyUI",
                                 prompt=PROMPT, extra_pnginfo=EXTRA)
    assert isinstance(result, NodeResult) and result.outputs == ()
    assert result.ui == {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "",
                                     "type": "output"}]}
    with Image.open(ctx.paths.output / "ComfyUI_00001_.png") as png:
        assert json.loads(png.text["prompt"]) == PROMPT
        assert json.loads(png.text["workflow"]) == EXTRA["workflow"]
        assert png.size == (6, 4) and png.mode == "RGB"


def test_save_image_pixels_are_truncated_to_bytes(ctx: NodeContext) -> None:
    image = torch.tensor([[[[0.0, 0.5, 1.0], [1.5, -1.0, 0.999]]]])
    SaveImage().execute(ctx, images=image, filename_prefix="px")
    with Image.open(ctx.paths.output / "px_00001_.png") as png:
        assert np.asarray(png).tolist() == [[[0, 127, 255], [255, 0, 254]]]


def test_save_image_counter_continues_from_existing_files(ctx: NodeContext) -> None:
    first = SaveImage().execute(ctx, images=ramp_image(batch=2), filename_prefix="run")
    second = SaveImage().execute(ctx, images=ramp_image(), filename_prefix="run")
    names = [e["filename"] for e in first.ui["images"] + second.ui["images"]]
    assert names == ["run_00001_.png", "run_00002_.png", "run_00003_.png"]


def test_save_image_counter_ignores_other_prefixes(ctx: NodeContext) -> None:
    ctx.paths.output.mkdir(parents=True)
    (ctx.paths.output / "other_00041_.png").touch()
    (ctx.paths.output / "run_00007_.png").touch()
    result = SaveImage().execute(ctx, images=ramp_image(), filename_prefix="run")
    assert result.ui["images"][0]["filename"] == "run_00008_.png"


def test_save_image_prefix_may_name_a_subfolder(ctx: NodeContext) -> None:
    result = SaveImage().execute(ctx, images=ramp_image(), filename_prefix="e2e/client")
    assert result.ui["images"] == [{"filename": "client_00001_.png", "subfolder": "e2e",
                                    "type": "output"}]
    assert (ctx.paths.output / "e2e" / "client_00001_.png").is_file()


@pytest.mark.parametrize("prefix", ["../escape", "a/../../escape", "/tmp/loom_escape"])
def test_save_image_refuses_a_prefix_outside_the_output_folder(ctx: NodeContext,
                                                               prefix: str) -> None:
    with pytest.raises(PathError, match="outside"):
        SaveImage().execute(ctx, images=ramp_image(), filename_prefix=prefix)


def test_save_image_expands_size_tokens(ctx: NodeContext) -> None:
    result = SaveImage().execute(ctx, images=ramp_image(), filename_prefix="img_%width%x%height%")
    assert result.ui["images"][0]["filename"] == "img_6x4_00001_.png"


def test_prefix_date_token_uses_the_editor_pattern() -> None:
    now = datetime(2026, 1, 7, 9, 5, 3)
    assert expand_prefix("%date:yyyy-MM-dd%/img", 0, 0, now) == "2026-01-07/img"
    assert format_date("yy.M.d hh:mm:ss", now) == "26.1.7 09:05:03"
    assert expand_prefix("%year%%month%%day%", 0, 0, now) == "20260107"


def test_next_counter_reads_digits_after_the_prefix(tmp_path: Path) -> None:
    for name in ("a_00003_.png", "a_00010_.latent", "a_x_.png", "ab_00099_.png"):
        (tmp_path / name).touch()
    assert next_counter(tmp_path, "a") == 11
    assert next_counter(tmp_path, "zzz") == 1


def test_preview_image_writes_to_temp_with_a_random_prefix(ctx: NodeContext) -> None:
    result = PreviewImage().execute(ctx, images=ramp_image(batch=2), prompt=PROMPT)
    entries = result.ui["images"]
    assert [e["type"] for e in entries] == ["temp", "temp"]
    assert re.fullmatch(r"ComfyUI_temp_[a-z]{5}_00001_\.png", entries[0]["filename"])
    assert (ctx.paths.temp / entries[1]["filename"]).is_file()


# -- LoadImage / LoadImageMask ------------------------------------------------------------------

def rgba_file(ctx: NodeContext, name: str = "rgba.png") -> Path:
    pixels = np.zeros((2, 3, 4), dtype=np.uint8)
    pixels[..., 0] = 200
    pixels[..., 3] = [[255, 0, 51], [102, 255, 0]]
    return write_input(ctx, name, Image.fromarray(pixels, "RGBA"))


def test_load_image_gives_rgb_and_one_minus_alpha(ctx: NodeContext) -> None:
    rgba_file(ctx)
    image, mask = LoadImage().execute(ctx, image="rgba.png")
    assert image.shape == (1, 2, 3, 3) and image.dtype == torch.float32
    assert torch.allclose(image[0, 0, 0], torch.tensor([200 / 255, 0, 0]))
    expected = 1.0 - torch.tensor([[255, 0, 51], [102, 255, 0]]) / 255.0
    assert mask.shape == (1, 2, 3) and torch.allclose(mask[0], expected)


def test_load_image_without_alpha_gives_an_empty_64px_mask(ctx: NodeContext) -> None:
    write_input(ctx, "rgb.jpg", Image.new("RGB", (5, 4), (10, 20, 30)))
    image, mask = LoadImage().execute(ctx, image="rgb.jpg")
    assert image.shape == (1, 4, 5, 3)
    assert mask.shape == (1, 64, 64) and not mask.any()


def test_load_image_palette_transparency_becomes_the_mask(ctx: NodeContext) -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 255, 255, 255])
    palette.putpixel((1, 0), 1)
    write_input(ctx, "pal.png", palette, transparency=0)
    _, mask = LoadImage().execute(ctx, image="pal.png")
    assert mask.tolist() == [[[1.0, 0.0]]]


def test_load_image_reads_every_same_size_frame_as_a_batch(ctx: NodeContext) -> None:
    frames = [Image.new("RGB", (4, 3), colour) for colour in ("red", "lime", "blue")]
    write_input(ctx, "anim.gif", frames[0], save_all=True, append_images=frames[1:])
    image, mask = LoadImage().execute(ctx, image="anim.gif")
    assert image.shape == (3, 3, 4, 3) and mask.shape[0] == 3
    assert image[1, 0, 0].argmax() == 1 and image[2, 0, 0].argmax() == 2


def test_load_image_applies_exif_orientation(ctx: NodeContext) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    write_input(ctx, "rotated.jpg", Image.new("RGB", (6, 2), "white"), exif=exif)
    image, _ = LoadImage().execute(ctx, image="rotated.jpg")
    assert image.shape == (1, 6, 2, 3)


def test_load_image_scales_16_bit_grey_to_0_1(ctx: NodeContext) -> None:
    grey = np.array([[0, 32768, 65535]], dtype=np.uint16)
    write_input(ctx, "deep.png", Image.fromarray(grey))
    image, _ = LoadImage().execute(ctx, image="deep.png")
    assert torch.allclose(image[0, 0, :, 1], torch.tensor([0.0, 32768 / 65535, 1.0]))


def test_load_image_mask_keeps_16_bit_grey_precision(ctx: NodeContext) -> None:
    write_input(ctx, "deep.png", Image.fromarray(np.array([[0, 65535, 257]], dtype=np.uint16)))
    (red,) = LoadImageMask().execute(ctx, image="deep.png", channel="red")
    (alpha,) = LoadImageMask().execute(ctx, image="deep.png", channel="alpha")
    assert torch.allclose(red, torch.tensor([[[0.0, 1.0, 257 / 65535]]]))
    assert not alpha.any()


def test_load_image_reads_an_annotated_output_file(ctx: NodeContext) -> None:
    SaveImage().execute(ctx, images=ramp_image(), filename_prefix="made")
    assert split_annotation("made_00001_.png [output]") == ("output", "made_00001_.png")
    image, _ = LoadImage().execute(ctx, image="made_00001_.png [output]")
    assert image.shape == (1, 4, 6, 3)


def test_load_image_missing_file_fails_validation(ctx: NodeContext) -> None:
    assert LoadImage().validate(ctx, image="nope.png") == ("image", "Invalid image file: nope.png")
    rgba_file(ctx)
    assert LoadImage().validate(ctx, image="rgba.png") is None
    assert "image" in LoadImage.self_validated_inputs()


def test_load_image_fingerprint_is_the_file_sha256(ctx: NodeContext) -> None:
    path = rgba_file(ctx)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert LoadImage().fingerprint(ctx, image="rgba.png") == expected
    assert LoadImage().fingerprint(ctx, image="gone.png") != expected


@pytest.mark.parametrize(("channel", "expected"), [
    ("alpha", [[0.0, 1.0, 0.8]]), ("red", [[200 / 255] * 3]), ("green", [[0.0] * 3]),
])
def test_load_image_mask_takes_one_channel(ctx: NodeContext, channel: str,
                                           expected: list[list[float]]) -> None:
    pixels = np.zeros((1, 3, 4), dtype=np.uint8)
    pixels[..., 0] = 200
    pixels[..., 3] = [255, 0, 51]
    write_input(ctx, "m.png", Image.fromarray(pixels, "RGBA"))
    (mask,) = LoadImageMask().execute(ctx, image="m.png", channel=channel)
    assert mask.shape == (1, 1, 3)
    assert torch.allclose(mask[0], torch.tensor(expected))


def test_load_image_mask_of_rgb_image_has_opaque_alpha(ctx: NodeContext) -> None:
    write_input(ctx, "rgb.png", Image.new("RGB", (2, 2), (0, 255, 0)))
    (alpha,) = LoadImageMask().execute(ctx, image="rgb.png", channel="alpha")
    (green,) = LoadImageMask().execute(ctx, image="rgb.png", channel="green")
    assert not alpha.any() and torch.all(green == 1.0)


# -- through the engine -------------------------------------------------------------------------

def graph_registry() -> NodeRegistry:
    registry = NodeRegistry()
    registry.register_all(ALL_IMAGE_NODES)
    return registry


def test_a_load_invert_save_graph_runs_and_embeds_the_prompt(ctx: NodeContext) -> None:
    rgba_file(ctx)
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "rgba.png"}},
           "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
           "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                       "filename_prefix": "graph"}}}
    registry = graph_registry()
    checked = validate_prompt(api, registry, ctx.services)
    assert checked.ok, checked.to_json()
    result = Executor(registry, ctx.services).execute(
        checked.prompt, checked.outputs, extra_data={"extra_pnginfo": EXTRA})
    assert result.ok, result.error
    assert result.outputs["3"]["images"][0]["filename"] == "graph_00001_.png"
    with Image.open(ctx.paths.output / "graph_00001_.png") as png:
        assert json.loads(png.text["prompt"]) == api
        assert json.loads(png.text["workflow"]) == EXTRA["workflow"]


def test_a_graph_with_a_missing_image_fails_validation_naming_the_file(
        ctx: NodeContext) -> None:
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "absent.png"}},
           "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    checked = validate_prompt(api, graph_registry(), ctx.services)
    errors = checked.node_errors["1"]["errors"]
    assert [e["details"] for e in errors] == ["image - Invalid image file: absent.png"]
