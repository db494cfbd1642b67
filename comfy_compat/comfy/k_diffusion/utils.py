"""ComfyUI's `comfy.k_diffusion.utils`: the image-folder dataset packs read extensions from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image


class FolderOfImages:
    """The images under a folder, recursively (k-diffusion's dataset)."""

    IMG_EXTENSIONS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}

    def __init__(self, root: str, transform: Any = None) -> None:
        self.root = Path(root)
        self.transform = transform or (lambda image: image)
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower()
                            in self.IMG_EXTENSIONS)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int) -> tuple[Any]:
        with Image.open(self.paths[key]) as image:
            return (self.transform(image.convert("RGB")),)
