"""Animated saves write one multi-frame file with the workflow embedded where ComfyUI puts it;
LoadImageOutput and WebcamCapture read images back from the output and temp folders."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from engine.context import NodeContext
from nodes.animation import SaveAnimatedPNG, SaveAnimatedWEBP
from nodes.imageio import LoadImageOutput, WebcamCapture
from tests.node_testing import run_node, run_ui

PROMPT = {"1": {"class_type": "EmptyImage", "inputs": {}}}
EXTRA = {"workflow": {"nodes": []}}


def frames(count: int = 3) -> torch.Tensor:
    return torch.linspace(0, 1, count).reshape(count, 1, 1, 1).expand(count, 4, 6, 3).clone()


def saved_file(ctx: NodeContext, ui: dict) -> Path:
    entry = ui["images"][0]
    assert entry["type"] == "output"
    return ctx.paths.output / entry["subfolder"] / entry["filename"]


def test_animated_png_holds_every_frame_and_the_workflow(ctx: NodeContext) -> None:
    ui = run_ui(SaveAnimatedPNG, ctx, images=frames(), filename_prefix="anim/clip", fps=4.0,
                compress_level=4, prompt=PROMPT, extra_pnginfo=EXTRA)
    path = saved_file(ctx, ui)
    assert path.name == "clip_00001_.png" and ui["animated"] == (True,)
    with Image.open(path) as picture:
        assert picture.n_frames == 3 and picture.info["duration"] == 250
    data = path.read_bytes()
    assert data.index(b"comfprompt\0" + json.dumps(PROMPT).encode()) > data.index(b"IDAT")
    assert b"comfworkflow\0" in data


def test_animated_webp_carries_the_prompt_in_exif(ctx: NodeContext) -> None:
    ui = run_ui(SaveAnimatedWEBP, ctx, images=frames(2), filename_prefix="clip", fps=10.0,
                lossless=True, quality=80, method="fastest", prompt=PROMPT,
                extra_pnginfo=EXTRA)
    with Image.open(saved_file(ctx, ui)) as picture:
        assert picture.n_frames == 2
        exif = picture.getexif()
    assert exif[0x0110] == "prompt:" + json.dumps(PROMPT)
    assert exif[0x010F] == "workflow:" + json.dumps(EXTRA["workflow"])


def test_a_single_frame_is_not_marked_animated(ctx: NodeContext) -> None:
    ui = run_ui(SaveAnimatedPNG, ctx, images=frames(1), filename_prefix="one", fps=6.0,
                compress_level=1)
    assert ui["animated"] == (False,)


def write_image(folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (5, 3), (255, 0, 0)).save(folder / name)


def test_load_image_output_reads_from_the_output_folder(ctx: NodeContext) -> None:
    write_image(ctx.paths.output, "result.png")
    image, mask = run_node(LoadImageOutput, ctx, image="result.png [output]")
    assert image.shape == (1, 3, 5, 3) and mask.shape == (1, 64, 64)
    (plain,) = run_node(LoadImageOutput, ctx, image="result.png")[:1]
    assert torch.equal(plain, image)


def test_load_image_output_reports_a_missing_file(ctx: NodeContext) -> None:
    verdict = LoadImageOutput().validate(ctx, image="nowhere.png")
    assert verdict == ("image", "Invalid image file: nowhere.png")


def test_load_image_output_stays_inside_its_folders(ctx: NodeContext) -> None:
    write_image(ctx.paths.base, "secret.png")
    assert LoadImageOutput().validate(ctx, image="../secret.png") is not None


def test_webcam_capture_reads_the_uploaded_frame(ctx: NodeContext) -> None:
    write_image(ctx.paths.temp / "webcam", "1700000000000.png")
    (image,) = run_node(WebcamCapture, ctx, image="webcam/1700000000000.png [temp]", width=0,
                        height=0, capture_on_queue=True)
    assert image.shape == (1, 3, 5, 3) and image[0, 0, 0].tolist() == [1.0, 0.0, 0.0]
