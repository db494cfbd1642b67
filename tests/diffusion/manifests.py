"""The reference checkpoint layouts of shared/formats/*.tsv: key -> (dtype, shape)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch

FORMATS_DIR = Path(__file__).resolve().parents[3] / "shared" / "formats"
TSV_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I32": torch.int32, "I64": torch.int64}


@cache
def manifest(name: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Entries of formats/<name>.tsv; skips the test when the shared folder is absent."""
    path = FORMATS_DIR / f"{name}.tsv"
    if not path.is_file():
        pytest.skip(f"reference layout {path} not found (shared folder absent)")
    entries = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, dtype, shape = line.split("\t")
        dims = () if shape == "scalar" else tuple(int(d) for d in shape.split("x"))
        entries[key] = (dtype, dims)
    return entries


def meta_state(name: str) -> dict[str, torch.Tensor]:
    """The layout as meta tensors (no memory): enough for key/shape based code."""
    return {key: torch.empty(shape, dtype=TSV_DTYPES[dtype], device="meta")
            for key, (dtype, shape) in manifest(name).items()}
