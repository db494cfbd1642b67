"""Live preview images as WebSocket binary frames.

Frame layouts (big-endian uint32 fields): type 1 = `[1][format][image]` for clients that did
not announce `supports_preview_metadata`; type 4 = `[4][N][N bytes of JSON metadata][image]` for
those that did. Format 1 is JPEG, 2 is PNG."""

from __future__ import annotations

import io
import json
import struct
from typing import Any

from PIL import Image

from engine.events import NodeLineage

PREVIEW_IMAGE = 1
PROGRESS_TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4
FORMAT_JPEG = 1
MAX_PREVIEW_SIDE = 512  # ComfyUI's default preview size; larger frames only cost bandwidth
JPEG_QUALITY = 95


class PreviewError(TypeError):
    """A node handed over a preview that is not an image."""


def encode_jpeg(image: Any, max_side: int = MAX_PREVIEW_SIDE) -> bytes:
    """A PIL image as JPEG bytes, scaled down to at most `max_side` pixels per side."""
    if not isinstance(image, Image.Image):
        raise PreviewError(f"a preview must be a PIL image, got {type(image).__name__}; "
                           f"convert it before passing it to ctx.progress")
    if image.mode != "RGB":
        image = image.convert("RGB")
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def preview_frame(jpeg: bytes, metadata: dict[str, Any] | None) -> bytes:
    """The binary frame of a JPEG preview: with metadata (type 4) or plain (type 1)."""
    if metadata is None:
        return struct.pack(">II", PREVIEW_IMAGE, FORMAT_JPEG) + jpeg
    header = json.dumps(metadata).encode()
    return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(header)) + header + jpeg


def text_frame(node_id: str, text: str | bytes) -> bytes:
    """The binary frame of a node's progress text: type 3, the node id's length (4 bytes,
    big-endian), the node id, then the text (UTF-8)."""
    body = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    node = str(node_id).encode("utf-8")
    return struct.pack(">II", PROGRESS_TEXT, len(node)) + node + body


def preview_metadata(prompt_id: str, node_id: str, lineage: NodeLineage | None = None
                     ) -> dict[str, Any]:
    """A preview's metadata; a node an expansion added shows on its display node."""
    return {"node_id": node_id, "prompt_id": prompt_id,
            "display_node_id": node_id if lineage is None else lineage.display_node,
            "parent_node_id": None if lineage is None else lineage.parent_node,
            "real_node_id": node_id if lineage is None else lineage.real_node_id,
            "image_type": "image/jpeg"}
