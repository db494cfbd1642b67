"""Seeded noise, drawn exactly as ComfyUI draws it, without touching torch's global RNG.

ComfyUI seeds the global generator (``torch.manual_seed``); a fresh ``torch.Generator``
seeded with the same number yields the same stream, so every draw here uses a private
generator and the rest of the process is unaffected.

The rules, for a KSampler ``seed``:

1. Initial noise (``initial_noise``): one generator on the CPU seeded with ``seed``; the
   whole latent batch is ``torch.randn(latent.shape)`` in float32 on the CPU, then cast to
   the latent's dtype. A latent carrying ``batch_index`` (taken from a bigger batch) instead
   gets one ``[1, C, H, W]`` draw for every index 0, 1, ..., max(batch_index) in turn from
   that generator, and sample j receives the draw of index ``batch_index[j]`` (the draws of
   indices not listed are made and thrown away; repeated indices share their draw).
2. Per-step noise of the ancestral samplers, ddpm, lcm and dpm_fast/dpm_adaptive with eta > 0
   (``SeededNoise.gaussian``): a generator on the latent's device seeded with ``seed + 1``
   when that device is the CPU and with ``seed`` otherwise; each step draws
   ``torch.randn(x.shape)`` in x's dtype from it.
3. Brownian noise of the SDE samplers (``SeededNoise.brownian``): a ``torchsde.BrownianTree``
   over [sigma_min, sigma_max] (the smallest non-zero and the largest sigma of the schedule)
   with ``entropy=seed`` and w0 = zeros like x. The step noise between sigma and sigma_next
   is ``(W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|)``. The plain samplers build
   the tree on the CPU (queries in float32 on the CPU); the ``_gpu`` variants build it on x's
   device, which is the same thing when x lives on the CPU.
4. ddim's inpainting noise (``random_inpaint_noise``): ``torch.randn(shape)`` in float32 on
   the CPU from a generator seeded with ``seed + 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import torch
from torch import Tensor

StepNoise = Callable[[Tensor, Tensor], Tensor]
"""``noise(sigma, sigma_next)``: unit-variance noise shaped like the latent for one step."""

ShapedNoise = Callable[[Sequence[int]], Tensor]
"""``noise(shape)``: unit-variance noise of any shape on the latent's device and dtype."""


class NoiseSource(Protocol):
    """Where a sampler gets its randomness; it builds a fresh stream for each sampling run."""

    def gaussian(self, x: Tensor) -> StepNoise:
        """Independent standard normal draws, one per call."""
        ...

    def gaussian_shaped(self, x: Tensor) -> ShapedNoise:
        """The same stream as ``gaussian``, each draw of the shape asked for (for samplers
        whose latent changes size as it goes, like SamplerLCMUpscale's)."""
        ...

    def brownian(
        self, x: Tensor, sigma_min: Tensor, sigma_max: Tensor, *, tree_on_cpu: bool
    ) -> StepNoise:
        """Normalised Brownian-motion increments over sigma in [sigma_min, sigma_max]."""
        ...


def initial_noise(latent: Tensor, seed: int, batch_index: Sequence[int] | None = None) -> Tensor:
    """The starting noise for a latent batch (rule 1 of this module's docstring)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if batch_index is None:
        return _cpu_randn(latent.size(), latent, generator)
    indices = [int(index) for index in batch_index]
    if not indices or min(indices) < 0:
        raise ValueError(
            f"batch_index must list non-negative sample positions, got {list(batch_index)}"
        )
    wanted = set(indices)
    sample_shape = [1, *latent.shape[1:]]
    draws = {}
    for index in range(max(indices) + 1):
        draw = _cpu_randn(sample_shape, latent, generator)
        if index in wanted:
            draws[index] = draw
    return torch.cat([draws[index] for index in indices], dim=0)


def _cpu_randn(shape: Sequence[int], like: Tensor, generator: torch.Generator) -> Tensor:
    noise = torch.randn(
        list(shape), dtype=torch.float32, layout=like.layout, generator=generator, device="cpu"
    )
    return noise.to(dtype=like.dtype)


def random_inpaint_noise(noise: Tensor, seed: int) -> Tensor:
    """The separate noise ddim re-noises the kept area of an inpainting with (rule 4)."""
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)
    fresh = torch.randn(noise.shape, generator=generator, device="cpu")
    return fresh.to(noise.dtype).to(noise.device)


@dataclass(frozen=True)
class SeededNoise:
    """ComfyUI's per-step noise for one seed (rules 2 and 3 of this module's docstring)."""

    seed: int

    def gaussian(self, x: Tensor) -> StepNoise:
        shaped = self.gaussian_shaped(x)

        def draw(sigma: Tensor, sigma_next: Tensor) -> Tensor:
            return shaped(x.size())

        return draw

    def gaussian_shaped(self, x: Tensor) -> ShapedNoise:
        seed = self.seed + 1 if x.device == torch.device("cpu") else self.seed
        generator = torch.Generator(device=x.device).manual_seed(seed)

        def draw(shape: Sequence[int]) -> Tensor:
            return torch.randn(
                list(shape), dtype=x.dtype, layout=x.layout, device=x.device, generator=generator
            )

        return draw

    def brownian(
        self, x: Tensor, sigma_min: Tensor, sigma_max: Tensor, *, tree_on_cpu: bool
    ) -> StepNoise:
        return _brownian_tree_noise(x, sigma_min, sigma_max, self.seed, tree_on_cpu)


def _load_torchsde() -> ModuleType:
    try:
        import torchsde
    except ModuleNotFoundError as missing:
        raise ModuleNotFoundError(
            "the SDE samplers (dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde and their _gpu variants) "
            "draw ComfyUI's Brownian-tree noise with the torchsde package, which is not "
            "installed; install it with `pip install torchsde` or pick another sampler"
        ) from missing
    return torchsde


def _brownian_tree_noise(
    x: Tensor, sigma_min: Tensor, sigma_max: Tensor, seed: int, tree_on_cpu: bool
) -> StepNoise:
    torchsde = _load_torchsde()
    t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
    orientation = 1 if t0 < t1 else -1
    t0, t1 = (t0, t1) if orientation == 1 else (t1, t0)
    w0 = torch.zeros_like(x)
    if tree_on_cpu:
        t0, w0, t1 = t0.detach().cpu(), w0.detach().cpu(), t1.detach().cpu()
    tree = torchsde.BrownianTree(t0, w0, t1, entropy=seed)

    def increment(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        start, end = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        low, high, sign = (start, end, 1) if start < end else (end, start, -1)
        device, dtype = low.device, low.dtype
        if tree_on_cpu:
            low, high = low.detach().cpu().float(), high.detach().cpu().float()
        w = tree(low, high).to(device=device, dtype=dtype) * (orientation * sign)
        return w / (end - start).abs().sqrt()

    return increment
