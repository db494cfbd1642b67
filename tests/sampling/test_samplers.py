"""The sampler registry, and every sampler with every scheduler on the Gaussian problem."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from engine.diffusion.sampling import (
    COMFYUI_SAMPLER_NAMES,
    SAMPLER_NAMES,
    SCHEDULER_NAMES,
    SamplerOptions,
    SeededNoise,
    get_sampler,
    initial_noise,
    model_sampling,
    sigmas_for,
)
from tests.recorded import data_json
from tests.sampling import (
    MU,
    exact_denoiser,
    exact_endpoint,
    ode_options,
    skip_without_torchsde,
    start_latent,
)

REPO = Path(__file__).resolve().parents[2]
SAMPLING = model_sampling()

STOCHASTIC = {
    "euler_ancestral", "euler_ancestral_cfg_pp", "exp_heun_2_x0_sde", "dpm_2_ancestral",
    "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu",
    "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver",
    "sa_solver_pece",
}  # fmt: skip
ALWAYS_STOCHASTIC = {"ddpm", "lcm"}  # no eta to switch their noise off
FIRST_ORDER = {"euler", "euler_cfg_pp", "ddim", "euler_ancestral", "euler_ancestral_cfg_pp",
               "heunpp2", "gradient_estimation", "gradient_estimation_cfg_pp"}
# ComfyUI 0.8's DPM++(2S) ancestral CFG++ adds the difference of two x0 estimates at every
# step (samplers_cfg_pp), so it does not follow the ODE: only finiteness is asserted.
NOT_ON_THE_ODE = {"dpmpp_2s_ancestral_cfg_pp"}

# iPNDM-v's variable-step weights blow up where the step size jumps (ComfyUI's too): on these
# schedules only finiteness and convergence are asserted.
UNSTABLE = {("ipndm_v", "beta"), ("ipndm_v", "linear_quadratic")}


def run(name: str, x: torch.Tensor, sigmas: torch.Tensor, seed: int = 0, **options: object):
    skip_without_torchsde(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchsde's float32 boundary warnings
        return get_sampler(name)(
            exact_denoiser,
            x,
            sigmas,
            extra_args={},
            callback=None,
            noise=SeededNoise(seed),
            options=SamplerOptions(**options),
        )


def test_sampler_names_are_comfyuis_in_comfyuis_order() -> None:
    ksampler = data_json("compat/object_info_core.json")["KSampler"]["input"]["required"]
    assert tuple(ksampler["sampler_name"][0]) == COMFYUI_SAMPLER_NAMES
    assert SAMPLER_NAMES == COMFYUI_SAMPLER_NAMES


def test_every_sampler_name_comfyui_offers_is_implemented() -> None:
    assert len(COMFYUI_SAMPLER_NAMES) == 44
    for name in COMFYUI_SAMPLER_NAMES:
        assert get_sampler(name).name == name


def test_an_unknown_sampler_name_suggests_the_closest() -> None:
    with pytest.raises(ValueError, match="unknown sampler 'eulr'.*did you mean 'euler'"):
        get_sampler("eulr")


def test_ksampler_rules_are_carried_by_the_spec() -> None:
    assert get_sampler("ddim").random_inpaint_noise
    assert not get_sampler("euler").random_inpaint_noise
    assert {name for name in SAMPLER_NAMES if get_sampler(name).discard_penultimate_sigma} == {
        "dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2",
    }  # fmt: skip


def test_invalid_options_are_rejected_with_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="solver_type 'rk4' is not one of midpoint, heun"):
        SamplerOptions(solver_type="rk4")
    with pytest.raises(ValueError, match="dpm_adaptive supports order 2 or 3, got 4"):
        run("dpm_adaptive", torch.zeros(1, 2), torch.tensor([2.0, 1.0, 0.0]), order=4)


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_with_every_scheduler_reaches_the_exact_answer(
    name: str, scheduler: str
) -> None:
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    errors = []
    for steps in (12, 36):
        sigmas = sigmas_for(SAMPLING, scheduler, steps, sampler_name=name)
        x = start_latent(z, float(sigmas[0]))
        out = run(name, x, sigmas, **ode_options(name))  # the stochastic samplers' ODE
        assert out.shape == x.shape and out.dtype == torch.float32
        assert bool(torch.isfinite(out).all())
        errors.append(float((out.double() - exact_endpoint(name, x, sigmas)).abs().max()))
    if name in STOCHASTIC:  # with their noise on: finite and centred (spread: see accuracy)
        sigmas = sigmas_for(SAMPLING, scheduler, 12, sampler_name=name)
        many = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        noisy = run(name, start_latent(many, float(sigmas[0])), sigmas)
        assert bool(torch.isfinite(noisy).all()) and abs(float(noisy.mean()) - MU) < 0.2
    if name in ALWAYS_STOCHASTIC or name in NOT_ON_THE_ODE:
        return
    if (name, scheduler) in UNSTABLE:
        assert errors[1] < errors[0] * 3
    elif name in FIRST_ORDER or name == "dpm_adaptive":  # dpm_adaptive: set by rtol/atol
        assert errors[1] < 0.25, errors
    else:
        assert errors[1] < 0.15, errors


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_the_same_seed_gives_bit_identical_latents(name: str) -> None:
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    sigmas = sigmas_for(SAMPLING, "karras", 6, sampler_name=name)
    x = start_latent(z, float(sigmas[0]))
    first, second = run(name, x, sigmas, seed=5), run(name, x, sigmas, seed=5)
    assert torch.equal(first, second)
    if name in STOCHASTIC:
        assert not torch.equal(first, run(name, x, sigmas, seed=6))


CROSS_PROCESS = ("euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde", "ddpm", "uni_pc", "deis")


def output_digests(names: tuple[str, ...]) -> dict[str, str]:
    """SHA-256 of each sampler's output for a txt2img-shaped run from seed 2024."""
    digests = {}
    for name in names:
        sigmas = sigmas_for(SAMPLING, "karras", 8, sampler_name=name)
        latent = torch.zeros(2, 4, 8, 8)
        noise = initial_noise(latent, 2024)
        x = SAMPLING.noise_scaling(sigmas[0], noise, latent, True)
        out = run(name, x, sigmas, seed=2024)
        digests[name] = hashlib.sha256(out.numpy().tobytes()).hexdigest()
    return digests


def test_the_same_seed_gives_bit_identical_latents_across_processes() -> None:
    pytest.importorskip("torchsde")
    script = (
        "import json, sys\n"
        "from tests.sampling.test_samplers import output_digests\n"
        "print(json.dumps(output_digests(tuple(sys.argv[1:]))))\n"
    )
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script, *CROSS_PROCESS],
        capture_output=True, text=True, cwd=REPO, env=env, check=True,
    )  # fmt: skip
    in_this_process = output_digests(CROSS_PROCESS)
    assert json.loads(result.stdout) == in_this_process == output_digests(CROSS_PROCESS)


def test_ancestral_noise_is_the_seed_plus_one_stream() -> None:
    """With D = 0 one Euler-ancestral step is x * sigma_down / sigma + n * sigma_up."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([3.0, 2.0])
    out = get_sampler("euler_ancestral")(
        lambda x, sigma: torch.zeros_like(x), x, sigmas, extra_args={}, callback=None,
        noise=SeededNoise(100), options=SamplerOptions(),
    )  # fmt: skip
    sigma_up = (4.0 * (9.0 - 4.0) / 9.0) ** 0.5
    sigma_down = (4.0 - sigma_up**2) ** 0.5
    fresh = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(101))
    assert torch.allclose(out, x * (sigma_down / 3.0) + fresh * sigma_up, atol=1e-6)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_callback_reports_every_step_with_the_denoised_latent(name: str) -> None:
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    sigmas = sigmas_for(SAMPLING, "normal", 7, sampler_name=name)
    x = start_latent(z, float(sigmas[0]))
    skip_without_torchsde(name)
    seen: list[tuple[int, float]] = []

    def callback(index: int, x_now: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor):
        assert x_now.shape == denoised.shape == x.shape and sigma.numel() == 1
        seen.append((index, float(sigma)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_sampler(name)(
            exact_denoiser, x, sigmas, extra_args={}, callback=callback,
            noise=SeededNoise(0), options=SamplerOptions(),
        )  # fmt: skip
    indices = [index for index, _ in seen]
    assert indices == list(range(len(seen)))
    if name == "dpm_fast":  # one report per solver step of up to three evaluations
        assert 1 <= len(seen) <= len(sigmas) - 1
    elif name != "dpm_adaptive":
        assert len(seen) == len(sigmas) - 1


def test_extra_args_reach_the_model() -> None:
    received: list[object] = []

    def model(x: torch.Tensor, sigma: torch.Tensor, **extra: object) -> torch.Tensor:
        received.append(extra)
        return exact_denoiser(x, sigma)

    get_sampler("dpmpp_2m")(
        model, torch.ones(1, 2), torch.tensor([3.0, 1.0, 0.0]), extra_args={"cond": "a cat"},
        callback=None, noise=SeededNoise(0), options=SamplerOptions(),
    )  # fmt: skip
    assert received == [{"cond": "a cat"}, {"cond": "a cat"}]


def test_samplers_run_without_building_autograd_graphs() -> None:
    x = torch.ones(1, 2, requires_grad=True)
    out = run("heun", x, torch.tensor([3.0, 1.0, 0.0]))
    assert not out.requires_grad


def test_gpu_variants_equal_the_cpu_tree_variants_for_cpu_latents() -> None:
    pytest.importorskip("torchsde")
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(8))
    sigmas = sigmas_for(SAMPLING, "karras", 5)
    x = start_latent(z, float(sigmas[0]))
    for name in ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"):
        assert torch.equal(run(name, x, sigmas, seed=2), run(name + "_gpu", x, sigmas, seed=2))


def test_ddim_is_euler() -> None:
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(9))
    sigmas = sigmas_for(SAMPLING, "ddim_uniform", 10)
    x = start_latent(z, float(sigmas[0]))
    assert torch.equal(run("ddim", x, sigmas), run("euler", x, sigmas))


def test_an_empty_or_single_sigma_schedule_returns_the_input() -> None:
    x = torch.ones(1, 3)
    for name in SAMPLER_NAMES:
        if name in ("uni_pc", "uni_pc_bh2"):
            continue  # UniPC needs at least one step
        assert torch.equal(run(name, x, torch.tensor([1.5])), x)
