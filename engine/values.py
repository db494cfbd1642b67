"""Typed values that flow between nodes, in the shapes ComfyUI custom nodes also expect.

IMAGE: torch float tensor [batch, height, width, channels] in 0..1.
MASK:  torch float tensor [batch, height, width] in 0..1 (1 = selected).
LATENT: a `Latent`, a dict subclass, so classic custom nodes that read latent["samples"] work.
        Its samples are the VAE's raw (unscaled) latents, as in ComfyUI; sampling applies the
        model family's scale (0.18215 SD1/SD2, 0.13025 SDXL) on the way in and out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Latent(dict):
    """A latent batch: `samples` [B, C, H, W], optional `noise_mask` and `batch_index`.

    Never mutated after creation: use `replace` to derive a new one."""

    def __init__(self, samples: Any, noise_mask: Any = None,
                 batch_index: list[int] | None = None, **extra: Any) -> None:
        super().__init__(samples=samples, **extra)
        if noise_mask is not None:
            self["noise_mask"] = noise_mask
        if batch_index is not None:
            self["batch_index"] = list(batch_index)

    @classmethod
    def of(cls, value: Mapping[str, Any]) -> Latent:
        """Accept a plain {"samples": ...} dict from a classic custom node."""
        if isinstance(value, Latent):
            return value
        if not isinstance(value, Mapping) or "samples" not in value:
            raise TypeError(f"expected a LATENT (a dict with 'samples'), "
                            f"got {type(value).__name__}")
        return cls(**dict(value))

    @property
    def samples(self) -> Any:
        return self["samples"]

    @property
    def noise_mask(self) -> Any:
        return self.get("noise_mask")

    @property
    def batch_index(self) -> list[int] | None:
        return self.get("batch_index")

    def replace(self, **changes: Any) -> Latent:
        """A copy with some fields changed (None removes an optional field)."""
        fields = dict(self)
        fields.update(changes)
        return Latent(**{k: v for k, v in fields.items() if v is not None or k == "samples"})
