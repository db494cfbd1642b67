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

The CFG++ samplers (Chung et al. 2024, arXiv 2406.08070) also need the unconditional x0 of
classifier-free guidance: ``denoise_with_uncond`` asks a ``GuidedDenoiser`` for both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from torch import Tensor

from engine.diffusion.sampling.noise import NoiseSource, StepNoise

Model = Callable[..., Tensor]
Callback = Callable[[int, Tensor, Tensor, Tensor], None]

DPMPP_SOLVER_TYPES: tuple[str, ...] = ("midpoint", "heun")  # dpmpp_2m_sde's correction
SEEDS_SOLVER_TYPES: tuple[str, ...] = ("phi_1", "phi_2")  # seeds_2's second stage
ER_SDE_SOLVER_TYPES: tuple[str, ...] = ("ER-SDE", "Reverse-time SDE", "ODE")  # er_sde's noise
SOLVER_TYPES: tuple[str, ...] = DPMPP_SOLVER_TYPES + SEEDS_SOLVER_TYPES + ER_SDE_SOLVER_TYPES
DEIS_MODES: tuple[str, ...] = ("tab", "rhoab")

_Value = TypeVar("_Value")


@dataclass(frozen=True)
class SamplerOptions:
    """Sampler settings; None picks the sampler's own ComfyUI default (given per field)."""

    eta: float | None = None  # ancestral/SDE noise amount: 1.0 (dpm_fast/dpm_adaptive: 0.0)
    s_noise: float | None = None  # multiplier on every injected noise draw: 1.0
    r: float | None = None  # dpmpp_sde and seeds_2 intermediate step ratio: 0.5
    # dpmpp_2m_sde: "midpoint" ("heun" for dpmpp_2m_sde_heun); seeds_2: "phi_1"
    # (exp_heun_2_x0: "phi_2"); er_sde: "ER-SDE" (see samplers_seeds.er_sde)
    solver_type: str | None = None
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
    ge_gamma: float | None = None  # gradient_estimation's gradient weight: 2.0
    max_stage: int | None = None  # er_sde's highest stage, 1 to 3: 3
    r_1: float | None = None  # seeds_3's two intermediate step ratios: 1/3 and 2/3
    r_2: float | None = None
    predictor_order: int | None = None  # sa_solver's Adams orders: predictor 3 (1 to 6),
    corrector_order: int | None = None  # corrector 4 (0 to 6, 0 = none)
    use_pece: bool | None = None  # sa_solver: re-evaluate the corrected state: False
    simple_order_2: bool | None = None  # sa_solver: the paper's simple order-2 weights: False
    # sa_solver's SDE interval: tau = eta while sde_end_sigma <= sigma <= sde_start_sigma,
    # else 0. None: 20% and 80% of the model's schedule (KSampler fills them in from the
    # MODEL; called directly, SD's standard schedule).
    sde_start_sigma: float | None = None
    sde_end_sigma: float | None = None

    def __post_init__(self) -> None:
        if self.solver_type is not None and self.solver_type not in SOLVER_TYPES:
            raise ValueError(
                f"solver_type {self.solver_type!r} is not one of {', '.join(SOLVER_TYPES)}"
            )
        if self.deis_mode is not None and self.deis_mode not in DEIS_MODES:
            raise ValueError(f"deis_mode {self.deis_mode!r} is not one of {', '.join(DEIS_MODES)}")
        if self.order is not None and self.order < 1:
            raise ValueError(f"order must be at least 1, got {self.order}")
        for name, low, high in _INT_RANGES:
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise ValueError(f"{name} must be from {low} to {high}, got {value}")


# The bounded integer options' ranges (the limits of ComfyUI's sampler nodes).
_INT_RANGES = (("max_stage", 1, 3), ("predictor_order", 1, 6), ("corrector_order", 0, 6))


def solver_type(options: SamplerOptions, sampler: str, allowed: tuple[str, ...],
                default: str) -> str:
    """The options' solver_type, checked against what `sampler` supports."""
    chosen = pick(options.solver_type, default)
    if chosen not in allowed:
        raise ValueError(f"{sampler} supports solver_type {', '.join(allowed)}, got {chosen!r}")
    return chosen


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


@runtime_checkable
class GuidedDenoiser(Protocol):
    """A model with classifier-free guidance that can also return its unconditional x0."""

    def __call__(self, x: Tensor, sigma: Tensor, **extra: object) -> Tensor: ...

    def with_uncond(self, x: Tensor, sigma: Tensor, **extra: object) -> tuple[Tensor, Tensor]:
        """(guided x0, unconditional x0), the uncond evaluated even at cfg 1."""
        ...


def denoise_with_uncond(model: Model, x: Tensor, sigma: Tensor,
                        extra_args: Mapping[str, object]) -> tuple[Tensor, Tensor]:
    """(x0, unconditional x0) for the CFG++ samplers; a model without guidance is its own
    uncond (as a guided model at cfg 1 with equal prompts would be)."""
    if isinstance(model, GuidedDenoiser):
        return model.with_uncond(x, sigma, **extra_args)
    denoised = model(x, sigma, **extra_args)
    return denoised, denoised


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
