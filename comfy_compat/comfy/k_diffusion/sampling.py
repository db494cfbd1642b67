"""ComfyUI's `comfy.k_diffusion.sampling` for custom-node packs: Loom's samplers under
k-diffusion's function names (`sample_euler`, `sample_dpmpp_2m` ...) and its schedules
(`get_sigmas_karras` ...). Each sampler takes k-diffusion's arguments; each carries the
name `comfy.samplers.KSAMPLER` uses to make a SAMPLER of it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from engine.diffusion.sampling import (
    SAMPLERS,
    SamplerOptions,
    SeededNoise,
    exponential,
    karras,
    polyexponential,
)

SamplerOption = frozenset(SamplerOptions.__dataclass_fields__)
# k-diffusion's noise samplers and solver classes: Loom's samplers draw their own noise.
INTERNALS = ("BrownianTreeNoiseSampler", "BatchedBrownianTree", "DPMSolver",
             "PIDStepSizeController", "get_sigmas_vp", "get_sigmas_laplace",
             "linear_multistep_coeff", "default_noise_sampler_gpu")


def _sampler(name: str) -> Callable[..., Tensor]:
    spec = SAMPLERS[name]

    def run(model: Any, x: Tensor, sigmas: Tensor, extra_args: dict[str, Any] | None = None,
            callback: Callable[[dict[str, Any]], Any] | None = None, disable: Any = None,
            **options: Any) -> Tensor:
        extra = dict(extra_args or {})
        seed = int(extra.pop("seed", 0) or 0)
        chosen = SamplerOptions(**{k: v for k, v in options.items() if k in SamplerOption
                                   and v is not None})
        return spec(model, x, sigmas, extra_args=extra, callback=_callback(callback),
                    noise=SeededNoise(seed), options=chosen)

    run.__name__ = f"sample_{name}"
    run.__doc__ = f"Loom's {name} sampler with k-diffusion's arguments."
    run.loom_sampler_name = name  # type: ignore[attr-defined]
    return run


def _callback(callback: Callable[[dict[str, Any]], Any] | None) -> Any:
    """k-diffusion's callback({"x", "i", "sigma", "sigma_hat", "denoised"})."""
    if callback is None:
        return None

    def report(step: int, x: Tensor, denoised: Tensor, sigma: Tensor) -> None:
        callback({"x": x, "i": step, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})

    return report


def __getattr__(name: str) -> Any:
    if name.startswith("sample_") and name[len("sample_"):] in SAMPLERS:
        return _sampler(name[len("sample_"):])
    if name in INTERNALS:
        from loom_internals import unavailable
        return unavailable(f"comfy.k_diffusion.sampling.{name}")
    raise AttributeError(f"comfy.k_diffusion.sampling has no {name!r} in Loom (its samplers: "
                         f"{', '.join('sample_' + n for n in SAMPLERS)})")


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                      device: Any = "cpu") -> Tensor:
    return karras(n, sigma_min, sigma_max, rho).to(device)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float,
                           device: Any = "cpu") -> Tensor:
    return exponential(n, sigma_min, sigma_max).to(device)


def get_sigmas_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0,
                               device: Any = "cpu") -> Tensor:
    return polyexponential(n, sigma_min, sigma_max, rho).to(device)


def append_zero(x: Tensor) -> Tensor:
    return torch.cat([x, x.new_zeros([1])])


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """The Karras ODE derivative (x - denoised) / sigma."""
    return (x - denoised) / sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def get_ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float = 1.0
                       ) -> tuple[Tensor, Tensor]:
    """(sigma_down, sigma_up) of an ancestral step (Karras et al. 2022, k-diffusion)."""
    if not eta:
        return sigma_to, torch.zeros_like(torch.as_tensor(sigma_to))
    sigma_up = torch.minimum(torch.as_tensor(sigma_to), eta * (
        sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def default_noise_sampler(x: Tensor, seed: int | None = None) -> Callable[..., Tensor]:
    generator = torch.Generator(device=x.device)
    if seed is not None:
        generator.manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(x.shape, dtype=x.dtype, device=x.device,
                                                 generator=generator)
