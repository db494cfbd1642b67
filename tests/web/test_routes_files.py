"""GET /view, POST /upload/image and /upload/mask (API.md section 4), and their confinement."""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import FormData

from tests.web.inprocess import SyncClient, decode, png_bytes, serving


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return tmp_path / "base"


@pytest.fixture
def client(base: Path) -> Iterator[SyncClient]:
    with serving(base) as (client, _):
        yield client


def put_output(base: Path, name: str, data: bytes) -> Path:
    path = base / "output" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def upload(client: SyncClient, data: bytes, name: str = "client.png", route: str = "image",
           **fields: str) -> tuple[int, object]:
    form = FormData()
    form.add_field("image", data, filename=name, content_type="image/png")
    for key, value in fields.items():
        form.add_field(key, value)
    reply = client.post(f"/api/upload/{route}", data=form)
    return reply.status, reply.json() if reply.status == 200 else reply.text


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims 10^10 pixels: a few dozen bytes that would decode to 10 GB."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + \
            struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# -- /view -------------------------------------------------------------------------------------

def test_view_returns_the_png_with_its_name(base: Path, client: SyncClient) -> None:
    data = png_bytes()
    put_output(base, "e2e/client_00001_.png", data)
    reply = client.get("/api/view", params={"filename": "client_00001_.png", "subfolder": "e2e",
                                             "type": "output", "rand": "0.5"})
    assert reply.status == 200
    assert reply.body == data
    assert reply.headers["Content-Type"] == "image/png"
    assert reply.headers["Content-Disposition"] == 'filename="client_00001_.png"'


def test_view_without_api_prefix_and_default_type_output(base: Path, client: SyncClient) -> None:
    put_output(base, "a.png", png_bytes())
    assert client.get("/view?filename=a.png").status == 200


@pytest.mark.parametrize(("preview", "content_type", "pil_format"),
                         [("webp;50", "image/webp", "WEBP"), ("jpeg;90", "image/jpeg", "JPEG")])
def test_view_preview_reencodes(base: Path, client: SyncClient, preview: str, content_type: str,
                                pil_format: str) -> None:
    put_output(base, "a.png", png_bytes(size=(16, 12)))
    reply = client.get("/view", params={"filename": "a.png", "preview": preview})
    assert reply.status == 200
    assert reply.headers["Content-Type"] == content_type
    assert reply.headers["Content-Disposition"] == 'filename="a.png"'
    image = decode(reply.body)
    assert (image.format, image.size) == (pil_format, (16, 12))


def test_view_channel_rgb_drops_alpha(base: Path, client: SyncClient) -> None:
    put_output(base, "a.png", png_bytes(color=(10, 20, 30, 40)))
    image = decode(client.get("/view?filename=a.png&channel=rgb").body)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (10, 20, 30)


def test_view_channel_a_returns_only_alpha(base: Path, client: SyncClient) -> None:
    put_output(base, "a.png", png_bytes(color=(10, 20, 30, 40)))
    reply = client.get("/view?filename=a.png&channel=a")
    assert reply.headers["Content-Type"] == "image/png"
    assert decode(reply.body).getpixel((0, 0)) == (0, 0, 0, 40)


def test_view_missing_file_is_404(client: SyncClient) -> None:
    assert client.get("/view?filename=nothing.png&type=output").status == 404


@pytest.mark.parametrize("query", [
    "filename=../secret.png", "filename=..%2Fsecret.png", "filename=%2e%2e%2fsecret.png",
    "filename=/etc/passwd", "filename=%2Fetc%2Fpasswd", "filename="])
def test_view_refuses_names_that_leave_the_folder(client: SyncClient, query: str) -> None:
    assert client.get(f"/view?{query}&type=output").status == 400


@pytest.mark.parametrize("subfolder", ["../..", "..%2F..", "%2e%2e%2f%2e%2e", "/etc", "a/../../.."])
def test_view_refuses_subfolders_outside_the_root(base: Path, client: SyncClient,
                                                  subfolder: str) -> None:
    (base / "secret.png").parent.mkdir(parents=True, exist_ok=True)
    (base / "secret.png").write_bytes(png_bytes())
    reply = client.get(f"/view?filename=secret.png&type=output&subfolder={subfolder}")
    assert reply.status == 403


def test_view_refuses_symlinks_pointing_outside(base: Path, tmp_path: Path,
                                                client: SyncClient) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png_bytes())
    (base / "output").mkdir(parents=True, exist_ok=True)
    os.symlink(outside / "secret.png", base / "output" / "link.png")
    os.symlink(outside, base / "output" / "linkdir")
    assert client.get("/view?filename=link.png").status == 403
    assert client.get("/view?filename=secret.png&subfolder=linkdir").status == 403


def test_view_unknown_type_is_400(client: SyncClient) -> None:
    assert client.get("/view?filename=a.png&type=models").status == 400


# -- /upload/image -----------------------------------------------------------------------------

def test_upload_then_view(client: SyncClient) -> None:
    data = png_bytes()
    assert upload(client, data) == (200, {"name": "client.png", "subfolder": "", "type": "input"})
    reply = client.get("/api/view?type=input&filename=client.png&subfolder=&rand=0.1")
    assert (reply.status, reply.body) == (200, data)
    assert client.get("/internal/files/input").json() == ["client.png"]


def test_upload_same_bytes_reuses_the_name(base: Path, client: SyncClient) -> None:
    data = png_bytes()
    upload(client, data)
    assert upload(client, data)[1]["name"] == "client.png"
    assert sorted(os.listdir(base / "input")) == ["client.png"]


def test_upload_different_bytes_gets_a_numbered_name(base: Path, client: SyncClient) -> None:
    upload(client, png_bytes(color=(1, 1, 1, 255)))
    assert upload(client, png_bytes(color=(2, 2, 2, 255)))[1]["name"] == "client (1).png"
    assert upload(client, png_bytes(color=(3, 3, 3, 255)))[1]["name"] == "client (2).png"
    assert (base / "input" / "client (1).png").read_bytes() == png_bytes(color=(2, 2, 2, 255))


def test_upload_overwrite_replaces_the_file(base: Path, client: SyncClient) -> None:
    upload(client, png_bytes(color=(1, 1, 1, 255)))
    second = png_bytes(color=(2, 2, 2, 255))
    assert upload(client, second, overwrite="true")[1]["name"] == "client.png"
    assert (base / "input" / "client.png").read_bytes() == second


def test_upload_creates_the_subfolder_and_honours_type(base: Path, client: SyncClient) -> None:
    status, body = upload(client, png_bytes(), subfolder="pasted/deep", type="temp")
    assert (status, body) == (200, {"name": "client.png", "subfolder": "pasted/deep",
                                    "type": "temp"})
    assert (base / "temp" / "pasted" / "deep" / "client.png").is_file()


def test_upload_without_image_field_is_400(client: SyncClient) -> None:
    form = FormData()
    form.add_field("type", "input")
    assert client.post("/upload/image", data=form).status == 400


@pytest.mark.parametrize("subfolder", ["../..", "/tmp", "a/../../x"])
def test_upload_refuses_subfolders_outside_the_root(base: Path, client: SyncClient,
                                                    subfolder: str) -> None:
    assert upload(client, png_bytes(), subfolder=subfolder)[0] == 403
    assert not (base / "x").exists()


def test_upload_refuses_a_symlinked_subfolder_leading_outside(base: Path, tmp_path: Path,
                                                             client: SyncClient) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (base / "input").mkdir(parents=True, exist_ok=True)
    os.symlink(outside, base / "input" / "escape")
    assert upload(client, png_bytes(), subfolder="escape")[0] == 403
    assert list(outside.iterdir()) == []


def raw_multipart(filename: str, data: bytes) -> tuple[bytes, str]:
    """A multipart body with the file name exactly as given (aiohttp's client would quote it)."""
    boundary = "loomtestboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"{filename}\"\r\nContent-Type: image/png\r\n\r\n").encode() + data + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("name", ["../evil.png", "/tmp/evil.png", "a/b.png", "..\\evil.png"])
def test_upload_refuses_file_names_with_folders(base: Path, tmp_path: Path, client: SyncClient,
                                               name: str) -> None:
    body, content_type = raw_multipart(name, png_bytes())
    reply = client.post("/upload/image", data=body, headers={"Content-Type": content_type})
    assert reply.status == 400
    assert not (base / "evil.png").exists()
    assert not (tmp_path / "evil.png").exists()


def test_upload_that_is_not_an_image_is_400_and_not_saved(base: Path, client: SyncClient) -> None:
    status, text = upload(client, b"<html>not an image</html>", name="page.png")
    assert status == 400
    assert "not a readable image" in text
    assert not (base / "input" / "page.png").exists()


def test_upload_decompression_bomb_is_refused(base: Path, client: SyncClient) -> None:
    status, text = upload(client, bomb_png(), name="bomb.png")
    assert status == 400
    assert "decompression bomb" in text.lower()
    assert not (base / "input" / "bomb.png").exists()


def test_upload_over_the_size_limit_is_413(tmp_path: Path) -> None:
    big = os.urandom(40 * 1024)
    with serving(tmp_path / "base", "--max-upload-size", "0.02") as (client, _):
        status, text = upload(client, big, name="big.png")
    assert status == 413
    assert "--max-upload-size" in text
    assert not (tmp_path / "base" / "input" / "big.png").exists()


# -- /upload/mask ------------------------------------------------------------------------------

def test_upload_mask_puts_the_mask_alpha_onto_the_original(base: Path, client: SyncClient) -> None:
    original = png_bytes(size=(4, 4), color=(200, 100, 50, 255), text={"workflow": "{}"})
    upload(client, original, name="photo.png")
    mask = png_bytes(size=(4, 4), color=(0, 0, 0, 30))
    ref = json.dumps({"filename": "photo.png", "subfolder": "", "type": "input"})
    status, body = upload(client, mask, name="clipspace-mask-1.png", route="mask",
                          original_ref=ref, type="input", subfolder="clipspace")
    assert (status, body) == (200, {"name": "clipspace-mask-1.png", "subfolder": "clipspace",
                                    "type": "input"})
    saved = decode((base / "input" / "clipspace" / "clipspace-mask-1.png").read_bytes())
    assert saved.getpixel((1, 1)) == (200, 100, 50, 30)
    assert saved.text == {"workflow": "{}"}


def test_upload_mask_refuses_an_original_outside_the_root(client: SyncClient) -> None:
    ref = json.dumps({"filename": "x.png", "subfolder": "../..", "type": "input"})
    assert upload(client, png_bytes(), route="mask", original_ref=ref)[0] == 403
    ref = json.dumps({"filename": "../x.png", "type": "input"})
    assert upload(client, png_bytes(), route="mask", original_ref=ref)[0] == 400


def test_upload_mask_with_a_missing_original_is_404(client: SyncClient) -> None:
    ref = json.dumps({"filename": "nothing.png", "type": "input"})
    assert upload(client, png_bytes(), route="mask", original_ref=ref)[0] == 404
