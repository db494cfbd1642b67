"""The sampler registry under ComfyUI's names: every sampler_name KSampler offers.

``get_sampler(name)`` returns a ``SamplerSpec``: call it like the sampler function itself.
Its flags carry the two things ComfyUI's KSampler does differently per sampler:
``discard_penultimate_sigma`` (the schedule is computed with one more step and its
second-to-last sigma dropped: see ``schedulers.sigmas_for``) and ``random_inpaint_noise``
(ddim re-noises the kept area of an inpainting with ``noise.random_inpaint_noise`` instead of
the initial noise).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor

from engine.diffusion.sampling import (
    sa_solver,
    samplers_cfg_pp,
    samplers_dpm_solver,
    samplers_dpmpp,
    samplers_euler,
    samplers_multistep,
    samplers_res,
    samplers_seeds,
    unipc,
)
from engine.diffusion.sampling.noise import NoiseSource
from engine.diffusion.sampling.samplers_common import (
    Callback,
    Model,
    SamplerFunction,
    SamplerOptions,
)
from engine.diffusion.sampling.schedulers import DISCARD_PENULTIMATE_SIGMA_SAMPLERS

# Every sampler_name ComfyUI's KSampler offers, in its order (compat/object_info_core.json).
COMFYUI_SAMPLER_NAMES: tuple[str, ...] = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2",
    "exp_heun_2_x0", "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast",
    "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde",
    "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp",
    "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver",
    "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
)  # fmt: skip


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: the pure function plus KSampler's per-sampler rules."""

    name: str
    function: SamplerFunction
    discard_penultimate_sigma: bool = False
    random_inpaint_noise: bool = False

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
    ) -> Tensor:
        with torch.no_grad():
            return self.function(
                model,
                x,
                sigmas,
                extra_args=extra_args,
                callback=callback,
                noise=noise,
                options=options,
            )


def _build_registry() -> Mapping[str, SamplerSpec]:
    functions: dict[str, SamplerFunction] = {
        "euler": samplers_euler.euler,
        "euler_cfg_pp": samplers_cfg_pp.euler_cfg_pp,
        "euler_ancestral": samplers_euler.euler_ancestral,
        "euler_ancestral_cfg_pp": samplers_cfg_pp.euler_ancestral_cfg_pp,
        "heun": samplers_euler.heun,
        "heunpp2": samplers_euler.heunpp2,
        "exp_heun_2_x0": samplers_seeds.exp_heun_2_x0,
        "exp_heun_2_x0_sde": samplers_seeds.exp_heun_2_x0_sde,
        "dpm_2": samplers_euler.dpm_2,
        "dpm_2_ancestral": samplers_euler.dpm_2_ancestral,
        "lms": samplers_multistep.lms,
        "dpm_fast": samplers_dpm_solver.dpm_fast,
        "dpm_adaptive": samplers_dpm_solver.dpm_adaptive,
        "dpmpp_2s_ancestral": samplers_dpmpp.dpmpp_2s_ancestral,
        "dpmpp_2s_ancestral_cfg_pp": samplers_cfg_pp.dpmpp_2s_ancestral_cfg_pp,
        "dpmpp_sde": samplers_dpmpp.dpmpp_sde,
        "dpmpp_sde_gpu": samplers_dpmpp.dpmpp_sde_gpu,
        "dpmpp_2m": samplers_dpmpp.dpmpp_2m,
        "dpmpp_2m_cfg_pp": samplers_cfg_pp.dpmpp_2m_cfg_pp,
        "dpmpp_2m_sde": samplers_dpmpp.dpmpp_2m_sde,
        "dpmpp_2m_sde_gpu": samplers_dpmpp.dpmpp_2m_sde_gpu,
        "dpmpp_2m_sde_heun": samplers_dpmpp.dpmpp_2m_sde_heun,
        "dpmpp_2m_sde_heun_gpu": samplers_dpmpp.dpmpp_2m_sde_heun_gpu,
        "dpmpp_3m_sde": samplers_dpmpp.dpmpp_3m_sde,
        "dpmpp_3m_sde_gpu": samplers_dpmpp.dpmpp_3m_sde_gpu,
        "ddpm": samplers_euler.ddpm,
        "lcm": samplers_euler.lcm,
        "ipndm": samplers_multistep.ipndm,
        "ipndm_v": samplers_multistep.ipndm_v,
        "deis": samplers_multistep.deis,
        "res_multistep": samplers_res.res_multistep,
        "res_multistep_cfg_pp": samplers_res.res_multistep_cfg_pp,
        "res_multistep_ancestral": samplers_res.res_multistep_ancestral,
        "res_multistep_ancestral_cfg_pp": samplers_res.res_multistep_ancestral_cfg_pp,
        "gradient_estimation": samplers_res.gradient_estimation,
        "gradient_estimation_cfg_pp": samplers_res.gradient_estimation_cfg_pp,
        "er_sde": samplers_seeds.er_sde,
        "seeds_2": samplers_seeds.seeds_2,
        "seeds_3": samplers_seeds.seeds_3,
        "sa_solver": sa_solver.sa_solver,
        "sa_solver_pece": sa_solver.sa_solver_pece,
        "ddim": samplers_euler.euler,  # ComfyUI's "ddim" is Euler (the same update for eps models)
        "uni_pc": unipc.uni_pc,
        "uni_pc_bh2": unipc.uni_pc_bh2,
    }
    if tuple(functions) != COMFYUI_SAMPLER_NAMES:
        raise RuntimeError("the sampler registry must list ComfyUI's sampler names in order")
    return MappingProxyType(
        {
            name: SamplerSpec(
                name,
                functions[name],
                discard_penultimate_sigma=name in DISCARD_PENULTIMATE_SIGMA_SAMPLERS,
                random_inpaint_noise=name == "ddim",
            )
            for name in functions
        }
    )


SAMPLERS: Mapping[str, SamplerSpec] = _build_registry()
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)


def get_sampler(name: str) -> SamplerSpec:
    """The sampler registered under a ComfyUI sampler_name; a clear error for any other name."""
    spec = SAMPLERS.get(name)
    if spec is not None:
        return spec
    close = difflib.get_close_matches(name, SAMPLER_NAMES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(
        f"unknown sampler {name!r}{hint}; valid samplers: {', '.join(SAMPLER_NAMES)}"
    )
