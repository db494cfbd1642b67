"""Image bombs: small files that declare huge pictures are measured (every frame) before any
pixel is decoded, at upload, at validation and in LoadImage, against --max-image-megapixels."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import FormData

from engine.context import InterruptFlag, NodeContext, Services
from engine.image_budget import ImageBudget, ImageTooLarge
from engine.paths import Paths
from nodes.imageio import LoadImage, LoadImageMask, load_image_file
from tests.adversarial.payloads import apng_bomb, one_bit_png
from tests.web.inprocess import serving


def upload(client: object, data: bytes, name: str = "bomb.png") -> object:
    form = FormData()
    form.add_field("image", data, filename=name, content_type="image/png")
    return client.post("/upload/image", data=form)  # type: ignore[attr-defined]


def test_the_animated_png_of_the_issue_is_refused_at_upload_by_default(tmp_path: Path) -> None:
    bomb = apng_bomb(4000, 4000, 300)  # ~21 KB; 4.8 gigapixels, 72 GiB as IMAGE and MASK
    assert len(bomb) < 40_000
    with serving(tmp_path / "base") as (client, _):
        reply = upload(client, bomb)
        assert reply.status == 400
        details = reply.json()["error"]["details"]
        assert "300 frames of 4000x4000" in details and "--max-image-megapixels" in details
    assert not (tmp_path / "base" / "input" / "bomb.png").exists()


def test_every_frame_counts_at_upload(tmp_path: Path) -> None:
    flags = ("--max-image-megapixels", "0.02")  # 20,000 pixels: one 64x64 frame fits, ten do not
    with serving(tmp_path / "base", *flags) as (client, _):
        assert upload(client, apng_bomb(64, 64, 1), "one.png").status == 200
        assert upload(client, apng_bomb(64, 64, 10), "ten.png").status == 400


def test_a_one_bit_giant_is_refused_beyond_the_budget(tmp_path: Path) -> None:
    with serving(tmp_path / "base", "--max-image-megapixels", "50") as (client, _):
        reply = upload(client, one_bit_png(9000, 9000))  # 10 KB, 81 megapixels
        assert reply.status == 400
        assert "9000x9000" in reply.json()["error"]["details"]


def context(base: Path, megapixels: float) -> NodeContext:
    services = Services(Paths.from_base(base),
                        image_budget=ImageBudget.from_megapixels(megapixels))
    return NodeContext(node_id="1", class_type="LoadImage", prompt_id="p", services=services,
                       interrupt=InterruptFlag())


def put_input(base: Path, name: str, data: bytes) -> None:
    (base / "input").mkdir(parents=True, exist_ok=True)
    (base / "input" / name).write_bytes(data)


def test_load_image_refuses_before_decoding(tmp_path: Path) -> None:
    put_input(tmp_path, "bomb.png", apng_bomb(4000, 4000, 300))
    with pytest.raises(ImageTooLarge, match="300 frames of 4000x4000"):
        load_image_file(tmp_path / "input" / "bomb.png", ImageBudget.from_megapixels(None))


def test_load_image_validation_names_the_size_and_the_flag(tmp_path: Path) -> None:
    put_input(tmp_path, "ten.png", apng_bomb(64, 64, 10))
    problem = LoadImage().validate(context(tmp_path, 0.02), image="ten.png")
    assert problem is not None and problem[0] == "image"
    assert "10 frames of 64x64" in problem[1] and "--max-image-megapixels" in problem[1]


def test_load_image_mask_counts_only_the_frame_it_decodes(tmp_path: Path) -> None:
    put_input(tmp_path, "ten.png", apng_bomb(64, 64, 10))
    ctx = context(tmp_path, 0.02)
    assert LoadImageMask().validate(ctx, image="ten.png", channel="red") is None
    assert LoadImageMask().execute(ctx, image="ten.png", channel="red")[0].shape == (1, 64, 64)


def test_an_oversized_input_image_is_a_400_at_post_prompt(tmp_path: Path) -> None:
    base = tmp_path / "base"
    put_input(base, "ten.png", apng_bomb(64, 64, 10))
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "ten.png"}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    with serving(base, "--max-image-megapixels", "0.02") as (client, server):
        reply = client.post("/prompt", json={"prompt": prompt})
        assert reply.status == 400
        assert "--max-image-megapixels" in str(reply.json()["node_errors"]["1"])
        assert server.queue.remaining() == 0


def test_frames_within_the_budget_still_load(tmp_path: Path) -> None:
    put_input(tmp_path, "ten.png", apng_bomb(64, 64, 10))
    images, masks = LoadImage().execute(context(tmp_path, 1), image="ten.png")
    assert images.shape == (10, 64, 64, 3) and masks.shape == (10, 64, 64)
