"""Error measures shared by the parity tests that compare our networks with a reference."""

from __future__ import annotations

import torch


def rel_err(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest absolute difference, relative to the reference's largest magnitude."""
    return float((ours - reference).abs().max() / reference.abs().max())
