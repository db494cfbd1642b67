"""The decoded-size budget for image files. A small file can declare a huge picture (a 10 KB PNG
of 9000x9000 1-bit pixels; a 34 KB animated PNG of 300 frames of 4000x4000), and loading one
costs frames x width x height x 16 bytes (IMAGE as float32 RGB plus MASK as float32). Files are
measured from their headers, before any pixel is decoded, at upload and where nodes load them."""

from __future__ import annotations

import os
from dataclasses import dataclass

from PIL import Image

FLAG = "--max-image-megapixels"
BYTES_PER_DECODED_PIXEL = 16  # float32 R, G, B of IMAGE + float32 MASK
# By default one image may take an eighth of physical memory once decoded: a big scan still
# loads, a decompression bomb cannot starve the models or the other prompts.
DEFAULT_RAM_SHARE = 8


class ImageTooLarge(ValueError):
    """An image whose decoded size exceeds the budget; the message names the size and the flag."""


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class ImageBudget:
    """At most `max_pixels` decoded pixels (frames x width x height) per image file."""

    max_pixels: int

    @classmethod
    def from_megapixels(cls, megapixels: float | None) -> ImageBudget:
        """`--max-image-megapixels`; by default an eighth of RAM at 16 bytes per pixel."""
        if megapixels is None:
            share = physical_memory_bytes() // DEFAULT_RAM_SHARE
            return cls(share // BYTES_PER_DECODED_PIXEL)
        if megapixels <= 0:
            raise ValueError(f"{FLAG} must be positive, got {megapixels}")
        return cls(int(megapixels * 1_000_000))

    def check(self, image: Image.Image, what: str, *, all_frames: bool = True) -> None:
        """ImageTooLarge unless `image` (opened, not decoded) fits: every frame counts when
        `all_frames`, else only the first (for readers that decode one frame)."""
        frames = max(int(getattr(image, "n_frames", 1) or 1), 1) if all_frames else 1
        self.check_pixels(frames, image.width, image.height, what)

    def check_pixels(self, frames: int, width: int, height: int, what: str) -> None:
        pixels = frames * width * height
        if pixels <= self.max_pixels:
            return
        shown = f"{frames} frames of {width}x{height}" if frames > 1 else f"{width}x{height}"
        raise ImageTooLarge(
            f"{what} decodes to {shown} pixels ({pixels / 1e6:.1f} megapixels, "
            f"{pixels * BYTES_PER_DECODED_PIXEL / 2**30:.1f} GiB as IMAGE and MASK), more than "
            f"the {self.max_pixels / 1e6:.1f} megapixels allowed; make the image smaller or "
            f"raise {FLAG}")
