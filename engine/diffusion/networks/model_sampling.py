"""The discrete noise schedule of the LDM checkpoints and the denoiser parameterisation.

The SD1/SD2/SDXL UNets were trained on a 1000-step DDPM schedule with "scaled linear"
betas. Samplers work in the variance-exploding picture instead: a noisy latent is
``x = x0 + sigma * eps`` with ``sigma_t = sqrt((1 - alphas_cumprod_t) / alphas_cumprod_t)``.
``ModelSampling`` holds that table and the sigma <-> timestep maps; ``Denoiser`` wraps a raw
network into the ``model(x, sigma, **extra) -> x0`` callable every sampler takes.

Parameterisations (x is the noisy latent, F the raw network output, sigma_data = 1):

=============  ===========================  ============================  =====================
prediction     c_skip                       c_out                         c_in
=============  ===========================  ============================  =====================
eps            1                            -sigma                        1/sqrt(sigma^2 + 1)
v_prediction   1/(sigma^2 + 1)              -sigma/sqrt(sigma^2 + 1)      1/sqrt(sigma^2 + 1)
x0             0                            1                             1/sqrt(sigma^2 + 1)
img_to_img     0                            1                             1
lcm            eps, then the consistency-model boundary condition below
=============  ===========================  ============================  =====================

``x0 = c_skip * x + c_out * F(c_in * x, t(sigma))``. LCM (Luo et al. 2023) takes the eps
estimate ``x0_eps = x - sigma * F`` and applies the consistency boundary scalings with
``sigma_data = 0.5`` at the scaled timestep ``s = 10 * t``:
``x0 = s / sqrt(s^2 + 0.25) * x0_eps + 0.25 / (s^2 + 0.25) * x``; its table keeps only the 50
timesteps 19, 39, ..., 999 the distilled model was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

PREDICTIONS: tuple[str, ...] = ("eps", "v_prediction", "lcm", "x0", "img_to_img")
# EDM's own parameterisation (Karras et al. 2022): c_out = +sigma * sigma_data / sqrt(...)
CONTINUOUS_PREDICTIONS: tuple[str, ...] = ("eps", "v_prediction", "edm")
CONTINUOUS_STEPS = 1000  # entries of a continuous schedule's sigma table (for the schedulers)
EDM_TIMESTEP_SCALE = 0.25  # EDM's c_noise = ln(sigma) / 4

# Zero-terminal-SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
# Flawed") drives the last alphas_cumprod to 0; ComfyUI pins it to this tiny value instead so
# that sigma_max stays finite (about 4519).
ZSNR_LAST_ALPHAS_CUMPROD = 4.8973451890853435e-08

LCM_TRAINING_TIMESTEPS = 50  # the distilled model's "original_inference_steps"
LCM_SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALING = 10.0


def scaled_linear_betas(linear_start: float, linear_end: float, timesteps: int) -> Tensor:
    """DDPM betas of the LDM checkpoints: linspace in sqrt(beta), squared (float64)."""
    return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2


def rescale_zero_terminal_snr(sigmas: Tensor) -> Tensor:
    """Algorithm 1 of Lin et al. (2024): shift and scale sqrt(alphas_cumprod) so the last is 0."""
    alphas_bar_sqrt = (1 / (sigmas * sigmas + 1)).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas_bar[-1] = ZSNR_LAST_ALPHAS_CUMPROD
    return ((1 - alphas_bar) / alphas_bar) ** 0.5


def _view_sigma(sigma: Tensor, ndim: int) -> Tensor:
    """A scalar stays a scalar; a per-sample [B] sigma becomes [B, 1, 1, ...] to broadcast."""
    if sigma.nelement() == 1:
        return sigma.view(())
    return sigma.view(sigma.shape[:1] + (1,) * (ndim - 1))


@dataclass(frozen=True, eq=False)
class ModelSampling:
    """A discrete sigma table (ascending, float32) plus one parameterisation.

    ``timestep_stride`` is 1 for the ordinary 1000-entry table and 20 for LCM's 50-entry
    table, whose entry k stands for timestep ``20 * k + 19``.
    """

    prediction: str
    sigmas: Tensor
    log_sigmas: Tensor
    timestep_stride: int = 1
    sigma_data: float = 1.0

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS + CONTINUOUS_PREDICTIONS:
            raise ValueError(
                f"prediction {self.prediction!r} is not one of {', '.join(PREDICTIONS)}; "
                "pick the type the checkpoint was trained with (SD2-768 is v_prediction)"
            )

    @property
    def sigma_min(self) -> Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: Tensor) -> Tensor:
        """The training timestep whose log-sigma is nearest to log(sigma) (an integer tensor)."""
        distances = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        index = distances.abs().argmin(dim=0).view(sigma.shape)
        stride = self.timestep_stride
        return (index * stride + (stride - 1)).to(sigma.device)

    def sigma(self, timestep: Tensor) -> Tensor:
        """Sigma at a (fractional) timestep: linear interpolation of the log-sigma table."""
        stride = self.timestep_stride
        position = ((timestep.float().to(self.log_sigmas.device) - (stride - 1)) / stride).float()
        position = torch.clamp(position, min=0, max=len(self.sigmas) - 1)
        low, high, weight = position.floor().long(), position.ceil().long(), position.frac()
        log_sigma = (1 - weight) * self.log_sigmas[low] + weight * self.log_sigmas[high]
        return log_sigma.exp().to(timestep.device)

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma at a fraction of the way through sampling (0 = start, 1 = end)."""
        if percent <= 0.0:
            return 999999999.9  # "before the first step": larger than any real sigma
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()

    def is_max_denoise(self, first_sigma: float) -> bool:
        """True when sampling starts from pure noise (first sigma >= sigma_max within 1e-5)."""
        sigma_max = float(self.sigma_max)
        return math.isclose(sigma_max, first_sigma, rel_tol=1e-05) or first_sigma > sigma_max

    def calculate_input(self, sigma: Tensor, x: Tensor) -> Tensor:
        """c_in * x: the network sees unit-variance input."""
        if self.prediction == "img_to_img":
            return x
        sigma = _view_sigma(sigma, x.ndim)
        return x / (sigma**2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma: Tensor, model_output: Tensor, x: Tensor) -> Tensor:
        """c_skip * x + c_out * F: the x0 estimate from the raw network output."""
        if self.prediction in ("x0", "img_to_img"):
            return model_output
        if self.prediction == "lcm":
            return self._lcm_denoised(sigma, model_output, x)
        sigma = _view_sigma(sigma, model_output.ndim)
        if self.prediction in ("v_prediction", "edm"):
            sigma_data = self.sigma_data
            variance = sigma**2 + sigma_data**2
            sign = 1.0 if self.prediction == "edm" else -1.0
            return (x * sigma_data**2 / variance
                    + sign * model_output * sigma * sigma_data / variance**0.5)
        return x - model_output * sigma

    def _lcm_denoised(self, sigma: Tensor, model_output: Tensor, x: Tensor) -> Tensor:
        shape = sigma.shape[:1] + (1,) * (model_output.ndim - 1)
        scaled_timestep = self.timestep(sigma).view(shape) * LCM_TIMESTEP_SCALING
        sigma = sigma.view(shape)
        x0 = x - model_output * sigma
        c_skip = LCM_SIGMA_DATA**2 / (scaled_timestep**2 + LCM_SIGMA_DATA**2)
        c_out = scaled_timestep / (scaled_timestep**2 + LCM_SIGMA_DATA**2) ** 0.5
        return c_out * x0 + c_skip * x

    def noise_scaling(
        self, sigma: Tensor, noise: Tensor, latent_image: Tensor, max_denoise: bool = False
    ) -> Tensor:
        """The starting latent ``latent + sigma * noise``.

        From pure noise (``max_denoise``) the noise is scaled by sqrt(1 + sigma^2) instead, the
        standard deviation of x at sigma_max when the latent has unit variance. Inpainting
        re-noises the kept area with this same function at every step.
        """
        sigma = _view_sigma(sigma, noise.ndim)
        scale = torch.sqrt(1.0 + sigma**2.0) if max_denoise else sigma
        return noise * scale + latent_image

    def inverse_noise_scaling(self, sigma: Tensor, latent: Tensor) -> Tensor:
        """Undo noise_scaling's latent scaling after sampling (identity for these types)."""
        return latent


def model_sampling(
    prediction: str = "eps",
    *,
    zsnr: bool = False,
    linear_start: float = 0.00085,
    linear_end: float = 0.012,
    timesteps: int = 1000,
) -> ModelSampling:
    """The schedule of an SD1/SD2/SDXL checkpoint (or its ModelSamplingDiscrete patch).

    Sigmas are computed in float64 and stored as float32; log-sigmas are taken in float64
    before rounding, as ComfyUI does.
    """
    betas = scaled_linear_betas(linear_start, linear_end, timesteps)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    if zsnr:
        sigmas = rescale_zero_terminal_snr(sigmas)
    if prediction != "lcm":
        return ModelSampling(prediction, sigmas.float(), sigmas.log().float())
    stride = timesteps // LCM_TRAINING_TIMESTEPS
    kept = sigmas.float()[stride - 1 :: stride]  # timesteps 19, 39, ..., 999
    return ModelSampling(prediction, kept, kept.log().float(), timestep_stride=stride)


@dataclass(frozen=True, eq=False)
class ContinuousModelSampling(ModelSampling):
    """A continuous sigma range (ModelSamplingContinuousEDM / ...V): the network's timestep is
    EDM's ln(sigma) / 4 (`timestep_kind` "edm") or 2 / pi * atan(sigma) ("v", the
    cosine-schedule v-models); the table holds 1000 log-spaced sigmas for the schedulers."""

    timestep_kind: str = "edm"

    def timestep(self, sigma: Tensor) -> Tensor:
        if self.timestep_kind == "v":
            return sigma.atan() / math.pi * 2
        return EDM_TIMESTEP_SCALE * sigma.log()

    def sigma(self, timestep: Tensor) -> Tensor:
        if self.timestep_kind == "v":
            return (timestep * math.pi / 2).tan()
        return (timestep / EDM_TIMESTEP_SCALE).exp()

    def percent_to_sigma(self, percent: float) -> float:
        """Log-linear between sigma_max (0) and sigma_min (1)."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        log_min = math.log(float(self.sigma_min))
        return math.exp((math.log(float(self.sigma_max)) - log_min) * (1.0 - percent) + log_min)


def continuous_model_sampling(prediction: str, sigma_min: float, sigma_max: float,
                              sigma_data: float = 1.0, timestep_kind: str = "edm"
                              ) -> ContinuousModelSampling:
    """A continuous schedule from sigma_min to sigma_max with one of CONTINUOUS_PREDICTIONS."""
    if prediction not in CONTINUOUS_PREDICTIONS:
        raise ValueError(f"prediction {prediction!r} is not one of "
                         f"{', '.join(CONTINUOUS_PREDICTIONS)} for a continuous schedule")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min {sigma_min} and sigma_max {sigma_max} must satisfy "
                         "0 < sigma_min < sigma_max; e.g. 0.002 and 120 (EDM)")
    sigmas = torch.linspace(math.log(sigma_min), math.log(sigma_max), CONTINUOUS_STEPS).exp()
    return ContinuousModelSampling(prediction, sigmas, sigmas.log(), sigma_data=sigma_data,
                                   timestep_kind=timestep_kind)


@dataclass(frozen=True)
class Denoiser:
    """Turns a raw network ``model_fn(x_in, timestep, **cond) -> F`` into ``x -> x0``.

    The network gets ``c_in * x`` and the nearest training timestep as a float tensor; its
    output is cast to float32 before the c_skip/c_out combination. Extra input channels
    (the 9-channel inpainting UNet's mask and masked image) are concatenated inside
    ``model_fn``, after the c_in scaling, as ComfyUI does.
    """

    model_fn: Callable[..., Tensor]
    model_sampling: ModelSampling

    def __call__(self, x: Tensor, sigma: Tensor, **extra: object) -> Tensor:
        sampling = self.model_sampling
        x_in = sampling.calculate_input(sigma, x)
        timestep = sampling.timestep(sigma).float()
        output = self.model_fn(x_in, timestep, **extra).float()
        return sampling.calculate_denoised(sigma, output, x)
