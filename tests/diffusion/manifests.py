"""The real checkpoint layouts recorded in tests/data/formats/*.tsv: key -> (dtype, shape)."""

from __future__ import annotations

from functools import cache

import torch

from tests.recorded import data_text

TSV_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I32": torch.int32, "I64": torch.int64}


@cache
def manifest(name: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Entries of tests/data/formats/<name>.tsv (sd15, sdxl_base, lora_sd15_kohya ...)."""
    entries = {}
    for line in data_text(f"formats/{name}.tsv").splitlines():
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
