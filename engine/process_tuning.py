"""Process settings that must be in place before torch is imported (main.py and the benchmarks
call `tune_before_torch()` first)."""

from __future__ import annotations

import os


def tune_before_torch() -> None:
    """PyTorch's CPU allocator then gives large tensors 2 MB-aligned, huge-page-advised memory
    (THP_MEM_ALLOC_ENABLE, read once by c10). A UNet step allocates activations of tens of MB
    whose 4 KB pages otherwise fault in on every step: ~7% of a CPU step on a 2-core host.
    Only sets the variable when the user has not."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
