"""Pillow work behind /view and /upload: checking an upload is a real image whose decoded size
(every frame) fits the image budget, putting a mask's alpha onto its original image, and the
preview/channel re-encodes of /view. Everything here is blocking; the routes run it in a worker
thread."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from engine.image_budget import ImageBudget, ImageTooLarge

PREVIEW_FORMATS = {"webp": ("WEBP", "image/webp"), "jpeg": ("JPEG", "image/jpeg")}
DEFAULT_PREVIEW_QUALITY = 90


class ImageError(ValueError):
    """An upload or file that is not a usable image (the message says why, for a 400)."""


def open_checked(data: bytes, what: str, budget: ImageBudget) -> Image.Image:
    """Open `data` as an image after Pillow's decompression-bomb guard, the decoded-size
    budget (every frame counted: LoadImage decodes them all) and a full verify."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            budget.check(probe, what)
            probe.verify()
        image = Image.open(io.BytesIO(data))
        image.load()
    except ImageTooLarge as exc:
        raise ImageError(str(exc)) from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{what} refused: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{what} is not a readable image ({exc})") from exc
    return image


def verify_upload(data: bytes, budget: ImageBudget) -> None:
    """Raise ImageError unless `data` decodes as an image within the budget."""
    open_checked(data, "the uploaded file", budget).close()


def _text_chunks(image: Image.Image) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in getattr(image, "text", {}).items():
        info.add_text(key, value)
    return info


def apply_mask(original: Path, mask_data: bytes, budget: ImageBudget) -> bytes:
    """The original image (RGBA) with its alpha channel replaced by the mask's alpha, as PNG,
    keeping the original's PNG text chunks (workflow metadata): what the mask editor saves."""
    mask = open_checked(mask_data, "the uploaded mask", budget)
    base = open_checked(original.read_bytes(), f"the original image {original.name}", budget)
    try:
        alpha = mask.convert("RGBA").getchannel("A")
        if alpha.size != base.size:
            alpha = alpha.resize(base.size, Image.Resampling.BILINEAR)
        composed = base.convert("RGBA")
        composed.putalpha(alpha)
        buffer = io.BytesIO()
        composed.save(buffer, format="PNG", compress_level=4, pnginfo=_text_chunks(base))
        return buffer.getvalue()
    finally:
        mask.close()
        base.close()


@dataclass(frozen=True)
class Rendition:
    """A re-encoded image for /view."""

    data: bytes
    content_type: str


def parse_preview(preview: str | None, channel: str) -> tuple[str, int] | None:
    """`preview=webp;50` -> ("webp", 50); unknown formats fall back to webp (as ComfyUI)."""
    if preview is None:
        return None
    fmt, _, quality = preview.partition(";")
    fmt = fmt.strip().lower()
    if fmt not in PREVIEW_FORMATS or channel == "a":
        fmt = "webp"
    return fmt, int(quality) if quality.strip().isdigit() else DEFAULT_PREVIEW_QUALITY


def _select_channel(image: Image.Image, channel: str) -> Image.Image:
    if channel == "rgb":
        return image.convert("RGB")
    if channel == "a":
        alpha = image.convert("RGBA").getchannel("A")  # opaque when the image has no alpha
        only_alpha = Image.new("RGBA", image.size, (0, 0, 0, 0))
        only_alpha.putalpha(alpha)
        return only_alpha
    return image


def render(path: Path, channel: str, preview: tuple[str, int] | None,
           budget: ImageBudget) -> Rendition:
    """The file at `path` reduced to a channel ("rgb", "a", "rgba") and/or re-encoded."""
    image = open_checked(path.read_bytes(), path.name, budget)
    try:
        selected = _select_channel(image, channel)
        buffer = io.BytesIO()
        if preview is None:
            selected.save(buffer, format="PNG")
            return Rendition(buffer.getvalue(), "image/png")
        fmt, quality = preview
        pil_format, content_type = PREVIEW_FORMATS[fmt]
        if fmt == "jpeg" or selected.mode not in ("RGB", "RGBA"):
            selected = selected.convert("RGB" if fmt == "jpeg" else "RGBA")
        selected.save(buffer, format=pil_format, quality=quality)
        return Rendition(buffer.getvalue(), content_type)
    finally:
        image.close()
