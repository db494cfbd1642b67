"""What every sampler shares: its signature, its options and a few step formulas.

Every sampler is ``sample(model, x, sigmas, *, extra_args, callback, noise, options) -> x``:

* ``model(x, sigma, **extra_args)`` returns the denoised (x0) estimate; ``sigma`` is a
  per-sample vector of shape [B].
* ``x`` is the starting latent already scaled to ``sigmas[0]`` (see
  ``ModelSampling.noise_scaling``); ``sigmas`` is a descending 1-D schedule, usually ending in 0.
* ``callback(step_index, x, denoised, sigma)`` is called once per step, before the update.
* ``noise`` hands out the randomness (``noise.SeededNoise`` reproduces ComfyUI's).
* ``options`` holds the tunable settings; a field left at None means "this sampler's
  ComfyUI default".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from torch import Tensor

from engine.diffusion.sampling.noise import NoiseSource, StepNoise

Model = Callable[..., Tensor]
Callback = Callable[[int, Tensor, Tensor, Tensor], None]

SOLVER_TYPES: tuple[str, ...] = ("midpoint", "heun")
DEIS_MODES: tuple[str, ...] = ("tab", "rhoab")

_Value = TypeVar("_Value")


@dataclass(frozen=True)
class SamplerOptions:
    """Sampler settings; None picks the sampler's own ComfyUI default (given per field)."""

    eta: float | None = None  # ancestral/SDE noise amount: 1.0 (dpm_fast/dpm_adaptive: 0.0)
    s_noise: float | None = None  # multiplier on every injected noise draw: 1.0
    r: float | None = None  # dpmpp_sde intermediate step ratio: 0.5
    solver_type: str | None = None  # dpmpp_2m_sde second-order correction: "midpoint"
    order: int | None = None  # lms 4, ipndm/ipndm_v 4, deis 3 (max orders), dpm_adaptive 3
    deis_mode: str | None = None  # deis coefficients: "tab"
    s_churn: float | None = None  # Karras churn for euler/heun/dpm_2/heunpp2: 0.0 (off)
    s_tmin: float | None = None  # churn only where sigma >= s_tmin: 0.0
    s_tmax: float | None = None  # churn only where sigma <= s_tmax: inf
    rtol: float | None = None  # dpm_adaptive relative tolerance: 0.05
    atol: float | None = None  # dpm_adaptive absolute tolerance: 0.0078
    h_init: float | None = None  # dpm_adaptive first step in log-sigma: 0.05
    pcoeff: float | None = None  # dpm_adaptive PID controller gains: 0.0, 1.0, 0.0
    icoeff: float | None = None
    dcoeff: float | None = None
    accept_safety: float | None = None  # dpm_adaptive step acceptance threshold: 0.81

    def __post_init__(self) -> None:
        if self.solver_type is not None and self.solver_type not in SOLVER_TYPES:
            raise ValueError(
                f"solver_type {self.solver_type!r} is not one of {', '.join(SOLVER_TYPES)}"
            )
        if self.deis_mode is not None and self.deis_mode not in DEIS_MODES:
            raise ValueError(f"deis_mode {self.deis_mode!r} is not one of {', '.join(DEIS_MODES)}")
        if self.order is not None and self.order < 1:
            raise ValueError(f"order must be at least 1, got {self.order}")


class SamplerFunction(Protocol):
    """The one signature every registered sampler has."""

    def __call__(
        self,
        model: Model,
        x: Tensor,
        sigmas: Tensor,
        *,
        extra_args: Mapping[str, object],
        callback: Callback | None,
        noise: NoiseSource,
        options: SamplerOptions,
    ) -> Tensor: ...


def pick(value: _Value | None, default: _Value) -> _Value:
    """An option's value, or the sampler's default when it was left unset."""
    return default if value is None else value


def notify(
    callback: Callback | None, index: int, x: Tensor, denoised: Tensor, sigma: Tensor
) -> None:
    if callback is not None:
        callback(index, x, denoised, sigma)


def half_log_snr(sigma: Tensor) -> Tensor:
    """lambda = log(alpha / sigma) of the discrete models, = -log(sigma) (DPM-Solver's t)."""
    return sigma.log().neg()


def sigma_at(lambda_: Tensor) -> Tensor:
    """The sigma whose half log-SNR is `lambda_`: exp(-lambda)."""
    return lambda_.neg().exp()


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """The probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (Karras eq. 3)."""
    return (x - denoised) / sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """Split a step into a deterministic move to sigma_down and fresh noise of size sigma_up.

    sigma_up^2 = eta^2 * sigma_to^2 * (sigma_from^2 - sigma_to^2) / sigma_from^2 (DDPM
    posterior variance at eta = 1) and sigma_down^2 = sigma_to^2 - sigma_up^2.
    """
    if not eta:
        return sigma_to, sigma_to.new_zeros(())
    sigma_up = min(
        sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    )
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


@dataclass(frozen=True)
class Churn:
    """Karras et al. (2022) Algorithm 2 stochasticity: raise sigma by gamma before a step.

    Off by default (s_churn = 0) and exposed by no core node. Loom draws its noise from the
    sampler's per-step stream; ComfyUI takes it from torch's global RNG.
    """

    s_churn: float
    s_tmin: float
    s_tmax: float
    s_noise: float

    @staticmethod
    def from_options(options: SamplerOptions) -> Churn:
        return Churn(
            pick(options.s_churn, 0.0),
            pick(options.s_tmin, 0.0),
            pick(options.s_tmax, float("inf")),
            pick(options.s_noise, 1.0),
        )

    def gamma(self, sigmas: Tensor, index: int) -> float:
        if self.s_churn > 0 and self.s_tmin <= sigmas[index] <= self.s_tmax:
            return min(self.s_churn / (len(sigmas) - 1), 2**0.5 - 1)
        return 0.0

    def apply(
        self, x: Tensor, sigmas: Tensor, index: int, draw: StepNoise
    ) -> tuple[Tensor, Tensor]:
        """(x moved up to sigma_hat, sigma_hat); draws noise only when gamma > 0."""
        gamma = self.gamma(sigmas, index)
        sigma = sigmas[index]
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            eps = draw(sigma, sigma_hat) * self.s_noise
            x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
        return x, sigma_hat
