"""UniPC (Zhao et al. 2023, arXiv 2302.04867): unified predictor-corrector multistep sampler.

Runs in the variance-preserving picture: x_vp = x / sqrt(1 + sigma^2), alpha = 1 /
sqrt(1 + sigma^2), std = sigma * alpha and lambda = log(alpha / std), with data prediction
(UniPC's "predict_x0"), order min(3, steps - 1), lower orders on the last steps, and the
corrector on every step but the last. A final sigma of 0 is replaced by 0.001 (the solver
needs a finite lambda); the result is mapped back to the sigma picture at that sigma.
``bh1`` and ``bh2`` choose B(h) = h or e^h - 1 (the paper's two variants).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.diffusion.sampling.noise import NoiseSource
from engine.diffusion.sampling.samplers_common import Callback, Model, SamplerOptions

FINAL_SIGMA = 0.001


@dataclass(frozen=True)
class _VP:
    """The variance-preserving coefficients of one per-sample sigma vector."""

    log_alpha: Tensor
    alpha: Tensor
    std: Tensor
    lambda_: Tensor

    @staticmethod
    def at(sigma: Tensor) -> _VP:
        log_alpha = 0.5 * torch.log(1 / ((sigma * sigma) + 1))
        std = torch.sqrt(1.0 - torch.exp(2.0 * log_alpha))
        lambda_ = log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))
        return _VP(log_alpha, torch.exp(log_alpha), std, lambda_)


def _per_sample(value: Tensor, ndim: int) -> Tensor:
    return value[(...,) + (None,) * (ndim - 1)]


@dataclass(frozen=True)
class _DataPrediction:
    """x0 from a VP-scaled latent, through the model's eps in the sigma picture."""

    model: Model
    extra_args: Mapping[str, object]

    def __call__(self, x_vp: Tensor, sigma: Tensor) -> Tensor:
        column = sigma.view(sigma.shape[:1] + (1,) * (x_vp.ndim - 1))
        x = x_vp * ((column**2 + 1.0) ** 0.5)
        eps = (x - self.model(x, sigma, **self.extra_args)) / column
        vp = _VP.at(sigma)
        return (x_vp - _per_sample(vp.std, x_vp.ndim) * eps) / _per_sample(vp.alpha, x_vp.ndim)


def _rhos(rks: Tensor, hh: Tensor, order: int, variant: str) -> tuple[Tensor, Tensor]:
    """R (rows rks^0 .. rks^(order-1)) and b (the phi_k(h) moments / B(h)), b in float64."""
    hh64 = hh.detach().cpu().double()
    h_phi_k = torch.expm1(hh64) / hh64 - 1
    b_h = hh64 if variant == "bh1" else torch.expm1(hh64)
    factorial, rows, moments = 1, [], []
    for i in range(1, order + 1):
        rows.append(torch.pow(rks, i - 1))
        moments.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh64 - 1 / factorial
    return torch.stack(rows), torch.tensor(moments, device=rks.device, dtype=hh.dtype)


def _update(
    predict: _DataPrediction,
    x: Tensor,
    history: list[Tensor],
    sigma_history: list[Tensor],
    sigma: Tensor,
    order: int,
    variant: str,
    use_corrector: bool,
) -> tuple[Tensor, Tensor | None]:
    """One UniPC step to ``sigma`` of the given order: predictor UniP, then corrector UniC."""
    ndim = x.ndim
    previous, target = _VP.at(sigma_history[-1]), _VP.at(sigma)
    model_prev_0 = history[-1]
    h = target.lambda_ - previous.lambda_
    rks, d1s = [], []
    for i in range(1, order):
        rk = ((_VP.at(sigma_history[-(i + 1)]).lambda_ - previous.lambda_) / h)[0]
        rks.append(rk)
        d1s.append((history[-(i + 1)] - model_prev_0) / rk)
    rks.append(torch.ones((), dtype=h.dtype, device=x.device))
    hh = -h[0]
    h_phi_1 = torch.expm1(hh)
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    r_matrix, b = _rhos(torch.stack(rks), hh, order, variant)
    stacked = torch.stack(d1s, dim=1) if d1s else None  # (B, K, C, H, W)
    x_base = (
        _per_sample(target.std / previous.std, ndim) * x
        - _per_sample(target.alpha * h_phi_1, ndim) * model_prev_0
    )
    scale = _per_sample(target.alpha * b_h, ndim)
    half = torch.tensor([0.5], dtype=b.dtype, device=b.device)
    if stacked is None:
        x_t = x_base - scale * 0  # first order: no predictor residual (kept for identical zeros)
    else:
        # order 2 uses the paper's simplified rho = 1/2 instead of solving R rho = b
        rhos_p = half if order == 2 else torch.linalg.solve(r_matrix[:-1, :-1], b[:-1])
        x_t = x_base - scale * torch.tensordot(stacked, rhos_p, dims=([1], [0]))
    if not use_corrector:
        return x_t, None
    rhos_c = half if order == 1 else torch.linalg.solve(r_matrix, b)
    model_t = predict(x_t, sigma)
    corr_res = 0 if stacked is None else torch.tensordot(stacked, rhos_c[:-1], dims=([1], [0]))
    x_t = x_base - scale * (corr_res + rhos_c[-1] * (model_t - model_prev_0))
    return x_t, model_t


def _unipc(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    variant: str,
) -> Tensor:
    timesteps = sigmas.clone()
    if sigmas[-1] == 0:
        timesteps[-1] = FINAL_SIGMA
    predict = _DataPrediction(model, extra_args)
    steps, batch = len(timesteps) - 1, x.shape[0]
    order = min(3, steps - 1)
    x = x / torch.sqrt(1.0 + timesteps[0] ** 2.0)
    history: list[Tensor] = []
    sigma_history: list[Tensor] = []
    for step_index in range(steps):
        if step_index == 0:
            vec = timesteps[0].expand(batch)
            history, sigma_history = [predict(x, vec)], [vec]
        elif step_index < order:  # warm-up with lower orders, corrector on
            vec = timesteps[step_index].expand(batch)
            x, model_x = _update(predict, x, history, sigma_history, vec, step_index, variant, True)
            history.append(predict(x, vec) if model_x is None else model_x)
            sigma_history.append(vec)
        else:
            last = step_index + (2 if step_index == steps - 1 else 1)
            for step in range(step_index, last):
                vec = timesteps[step].expand(batch)
                step_order = min(order, steps + 1 - step)
                x, model_x = _update(
                    predict, x, history, sigma_history, vec, step_order, variant, step != steps
                )
                # Slide the window; after the final step the newest estimate stays in place.
                history, sigma_history = history[1:] + history[-1:], sigma_history[1:] + [vec]
                if step < steps:
                    history[-1] = predict(x, vec) if model_x is None else model_x
        if callback is not None:
            reached = steps if 0 < step_index == steps - 1 else step_index
            sigma_now = timesteps[reached]
            callback(step_index, x / _VP.at(sigma_now).alpha, history[-1], sigma_now)
    return x / _VP.at(timesteps[-1]).alpha


def uni_pc(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """UniPC multistep with B(h) = h ("bh1"), Zhao et al. (2023)."""
    return _unipc(model, x, sigmas, extra_args, callback, "bh1")


def uni_pc_bh2(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, object],
    callback: Callback | None,
    noise: NoiseSource,
    options: SamplerOptions,
) -> Tensor:
    """UniPC multistep with B(h) = e^h - 1 ("bh2"), Zhao et al. (2023)."""
    return _unipc(model, x, sigmas, extra_args, callback, "bh2")
