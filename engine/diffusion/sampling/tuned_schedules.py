"""Schedules read from published tables of tuned noise levels, stretched to any step count.

* Align Your Steps (Sabour et al. 2024, NVIDIA): 10-step schedules optimised for SD1, SDXL
  and SVD.
* GITS (Chen et al. 2024, "On the trajectory regularity of ODE-based diffusion sampling"):
  one schedule per step count from 2 to 20 for each guidance coefficient 0.80, 0.85, ...,
  1.50 (tuned on SD1.5); ``data/gits_noise_levels.json`` holds the published table.
* OptimalSteps (Pei et al. 2025): schedules for the flow models FLUX, Wan and Chroma, whose
  sigmas run from 1 to 0 (Loom runs none of them; the node still computes the schedule).

A table whose length is not ``steps + 1`` is resampled by linear interpolation of log(sigma)
over evenly spaced positions. ``denoise`` < 1 keeps the last ``round(steps * denoise)`` steps
of that schedule; the final sigma is always replaced by 0, as ComfyUI does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from importlib import resources
from types import MappingProxyType
from typing import Any, TypeVar

import numpy
import torch
from torch import Tensor

ALIGN_YOUR_STEPS: Mapping[str, tuple[float, ...]] = MappingProxyType({
    "SD1": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177,
            1.3943805092, 0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662,
            0.0291671582),
    "SDXL": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945,
             0.8620721141, 0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177,
             0.0291671582),
    "SVD": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
})

OPTIMAL_STEPS: Mapping[str, tuple[float, ...]] = MappingProxyType({
    "FLUX": (0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512, 0.2808,
             0.001),
    "Wan": (1.0, 0.997, 0.995, 0.993, 0.991, 0.989, 0.987, 0.985, 0.98, 0.975, 0.973, 0.968,
            0.96, 0.946, 0.927, 0.902, 0.864, 0.776, 0.539, 0.208, 0.001),
    "Chroma": (0.992, 0.99, 0.988, 0.985, 0.982, 0.978, 0.973, 0.968, 0.961, 0.953, 0.943,
               0.931, 0.917, 0.9, 0.881, 0.858, 0.832, 0.802, 0.769, 0.731, 0.69, 0.646,
               0.599, 0.55, 0.501, 0.451, 0.402, 0.355, 0.311, 0.27, 0.232, 0.199, 0.169,
               0.143, 0.12, 0.101, 0.084, 0.07, 0.058, 0.048, 0.001),
})

GITS_COEFFS: tuple[float, ...] = tuple(round(0.80 + 0.05 * index, 2) for index in range(15))
GITS_TABLE_STEPS = 20  # GITS publishes schedules for 2 to 20 steps; more are interpolated

_Entry = TypeVar("_Entry")


def loglinear_interp(levels: Sequence[float], count: int) -> numpy.ndarray:
    """`count` sigmas from a descending table, linear in log(sigma) between table entries."""
    ascending_logs = numpy.log(numpy.asarray(levels, dtype=numpy.float64)[::-1])
    positions = numpy.linspace(0, 1, count)
    table_positions = numpy.linspace(0, 1, len(levels))
    return numpy.exp(numpy.interp(positions, table_positions, ascending_logs))[::-1].copy()


def _finish(levels: Sequence[float] | numpy.ndarray, steps: int, denoise: float) -> Tensor:
    """The last round(steps * denoise) steps of `levels` with the final sigma set to 0."""
    if denoise <= 0.0:
        return torch.FloatTensor([])
    kept = steps if denoise >= 1.0 else round(steps * denoise)
    tail = list(levels[-(kept + 1):])
    tail[-1] = 0.0
    return torch.FloatTensor(tail)


def _stretched(levels: Sequence[float], steps: int) -> Sequence[float] | numpy.ndarray:
    return levels if steps + 1 == len(levels) else loglinear_interp(levels, steps + 1)


def align_your_steps(model_type: str, steps: int, denoise: float = 1.0) -> Tensor:
    """AlignYourStepsScheduler: the model type's 10-step table stretched to `steps`."""
    levels = _table(ALIGN_YOUR_STEPS, model_type, "model_type")
    return _finish(_stretched(levels, steps), steps, denoise)


def optimal_steps(model_type: str, steps: int, denoise: float = 1.0) -> Tensor:
    """OptimalStepsScheduler: the flow model's table stretched to `steps`."""
    levels = _table(OPTIMAL_STEPS, model_type, "model_type")
    return _finish(_stretched(levels, steps), steps, denoise)


def gits(coeff: float, steps: int, denoise: float = 1.0) -> Tensor:
    """GITSScheduler: the published schedule for this coefficient and step count (20-step one
    stretched beyond 20)."""
    if steps < 2:
        raise ValueError(f"GITS needs at least 2 steps, got {steps}")
    rows = _table(gits_noise_levels(), round(coeff, 2), "coeff")
    if steps <= GITS_TABLE_STEPS:
        return _finish(rows[steps - 2], steps, denoise)
    return _finish(loglinear_interp(rows[-1], steps + 1), steps, denoise)


def gits_noise_levels() -> Mapping[float, tuple[tuple[float, ...], ...]]:
    """GITS's table: coefficient -> one descending schedule per step count 2..20."""
    text = resources.files("engine.diffusion.sampling").joinpath(
        "data/gits_noise_levels.json").read_text(encoding="utf-8")
    return {float(coeff): tuple(tuple(row) for row in rows)
            for coeff, rows in json.loads(text).items()}


def _table(tables: Mapping[Any, _Entry], key: Any, what: str) -> _Entry:
    if key not in tables:
        raise ValueError(f"{what} {key!r} has no published schedule; use one of "
                         f"{', '.join(str(name) for name in tables)}")
    return tables[key]
