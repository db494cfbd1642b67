"""The custom sampling nodes one by one: what each SAMPLER node chooses, what each scheduler
and sigma tool computes (formulas written out here), and the DualCFGGuider's combination.
Runs through the engine on tiny checkpoints are in test_sampling_nodes.py."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.context import InterruptFlag, NodeContext, Services
from engine.diffusion.patches.model_handle import SD1_LATENT, ModelHandle
from engine.diffusion.sampling import SamplerOptions, SeededNoise, model_sampling
from engine.diffusion.sampling import dual_guidance as dual_module
from engine.diffusion.sampling.dual_guidance import DualGuidedModel
from engine.diffusion.sampling.ksampler import SamplerChoice
from engine.paths import Paths
from nodes import custom_samplers as samplers
from nodes import custom_schedulers as schedulers
from nodes.custom_sampling import add_noise
from tests.sampling import MU, exact_denoiser

SAMPLING = model_sampling()


@pytest.fixture
def ctx(tmp_path: Path) -> NodeContext:
    return NodeContext(node_id="1", class_type="Test", prompt_id="p",
                       services=Services(Paths.from_base(tmp_path)), interrupt=InterruptFlag())


def schedule_only_model(zsnr: bool = False) -> ModelHandle:
    """A MODEL with a schedule and latent format but no network (for nodes that read only
    those)."""
    return ModelHandle(unet=None, config=None, family="sd1",  # type: ignore[arg-type]
                       sampling=model_sampling(zsnr=zsnr), latent_format=SD1_LATENT,
                       dtype=torch.float32, device=torch.device("cpu"))


def choice(node: type, ctx: NodeContext, **inputs: Any) -> SamplerChoice:
    (result,) = node().execute(ctx, **inputs)
    assert isinstance(result, SamplerChoice)
    return result


@pytest.mark.parametrize(("device", "name"), [("gpu", "dpmpp_2m_sde_gpu"),
                                              ("cpu", "dpmpp_2m_sde")])
def test_sde_sampler_nodes_pick_where_the_brownian_tree_lives(ctx: NodeContext, device: str,
                                                              name: str) -> None:
    picked = choice(samplers.SamplerDPMPP_2M_SDE, ctx, solver_type="heun", eta=0.5,
                    s_noise=0.9, noise_device=device)
    assert picked.name == name
    assert picked.options == SamplerOptions(eta=0.5, s_noise=0.9, solver_type="heun")
    assert choice(samplers.SamplerDPMPP_3M_SDE, ctx, eta=1.0, s_noise=1.0,
                  noise_device=device).name == name.replace("2m", "3m")
    sde = choice(samplers.SamplerDPMPP_SDE, ctx, eta=1.0, s_noise=1.0, r=0.3, noise_device=device)
    assert sde.name == name.replace("2m_sde", "sde") and sde.options.r == 0.3


def test_setting_nodes_carry_their_widgets_into_the_sampler_options(ctx: NodeContext) -> None:
    assert choice(samplers.SamplerEulerAncestral, ctx, eta=0.4, s_noise=1.2) == SamplerChoice(
        "euler_ancestral", SamplerOptions(eta=0.4, s_noise=1.2))
    assert choice(samplers.SamplerEulerAncestralCFGPP, ctx, eta=0.4, s_noise=1.0).name == \
        "euler_ancestral_cfg_pp"
    assert choice(samplers.SamplerLMS, ctx, order=3).options.order == 3
    assert choice(samplers.SamplerDPMPP_2S_Ancestral, ctx, eta=0.0, s_noise=1.0).options.eta == 0
    adaptive = choice(samplers.SamplerDPMAdaptative, ctx, order=2, rtol=0.01, atol=0.001,
                      h_init=0.1, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.9,
                      eta=0.0, s_noise=1.0)
    assert adaptive.name == "dpm_adaptive" and adaptive.options.rtol == 0.01
    er_sde = choice(samplers.SamplerER_SDE, ctx, solver_type="Reverse-time SDE", max_stage=2,
                    eta=0.5, s_noise=1.0)
    assert er_sde.options == SamplerOptions(solver_type="Reverse-time SDE", max_stage=2,
                                            eta=0.5, s_noise=1.0)
    seeds = choice(samplers.SamplerSEEDS2, ctx, solver_type="phi_2", eta=0.0, s_noise=1.0, r=1.0)
    assert seeds.name == "seeds_2" and seeds.options.solver_type == "phi_2"


def test_ksampler_select_offers_every_comfyui_sampler(ctx: NodeContext) -> None:
    offered = samplers.KSamplerSelect.schema.input("sampler_name").choices
    assert len(offered) == 44
    for name in offered:
        assert choice(samplers.KSamplerSelect, ctx, sampler_name=name).spec.name == name


def test_sa_solver_node_turns_sampling_percents_into_the_models_sigmas(ctx: NodeContext) -> None:
    for zsnr in (False, True):
        model = schedule_only_model(zsnr)
        picked = choice(samplers.SamplerSASolver, ctx, model=model, eta=0.5,
                        sde_start_percent=0.1, sde_end_percent=0.7, s_noise=1.0,
                        predictor_order=2, corrector_order=1, use_pece=True,
                        simple_order_2=False)
        assert picked.name == "sa_solver"
        assert picked.options.sde_start_sigma == model.sampling.percent_to_sigma(0.1)
        assert picked.options.sde_end_sigma == model.sampling.percent_to_sigma(0.7)
        assert picked.options.use_pece and picked.options.predictor_order == 2


def test_ksampler_fills_sa_solvers_default_interval_from_the_model() -> None:
    sampling = model_sampling(zsnr=True)
    options = SamplerChoice("sa_solver").options_for(sampling)
    assert options.sde_start_sigma == sampling.percent_to_sigma(0.2)
    assert options.sde_end_sigma == sampling.percent_to_sigma(0.8)
    chosen = SamplerOptions(sde_start_sigma=5.0, sde_end_sigma=1.0)
    assert SamplerChoice("sa_solver", chosen).options_for(sampling) == chosen


def test_euler_cfg_pp_node_versions(ctx: NodeContext) -> None:
    assert choice(samplers.SamplerEulerCFGpp, ctx, version="regular").spec.name == "euler_cfg_pp"
    alternative = choice(samplers.SamplerEulerCFGpp, ctx, version="alternative")
    assert alternative.spec.name == "euler_cfg_pp_alternative"
    sigmas, x = torch.tensor([3.0, 1.0, 0.0]), torch.ones(1, 4, 2, 2)
    out = alternative.spec(exact_denoiser, x, sigmas, extra_args={}, callback=None,
                           noise=SeededNoise(0), options=SamplerOptions())
    # without guidance D_u = D, so each step is Euler along (x - D) / sigma
    expected = x.double()
    for sigma, sigma_next in ((3.0, 1.0), (1.0, 0.0)):
        denoised = exact_denoiser(expected, torch.tensor([sigma], dtype=torch.float64))
        expected = expected + (expected - denoised) / sigma * (sigma_next - sigma)
    assert torch.allclose(out.double(), expected, atol=1e-6)


def test_lcm_upscale_grows_the_latent_over_its_upscale_steps(ctx: NodeContext) -> None:
    built = choice(samplers.SamplerLCMUpscale, ctx, scale_ratio=2.0, scale_steps=2,
                   upscale_method="bilinear")
    sizes: list[tuple[int, ...]] = []
    sigmas = torch.tensor([8.0, 3.0, 1.0, 0.3, 0.0])
    out = built.spec(exact_denoiser, torch.zeros(1, 4, 8, 8), sigmas, extra_args={},
                     callback=lambda i, x, d, s: sizes.append(tuple(x.shape[-2:])),
                     noise=SeededNoise(1), options=SamplerOptions())
    assert sizes == [(8, 8), (12, 12), (16, 16), (16, 16)]  # 1x, 1.5x, 2x over 2 steps
    assert out.shape == (1, 4, 16, 16) and float(out.mean()) == pytest.approx(MU, abs=0.05)
    default = choice(samplers.SamplerLCMUpscale, ctx, scale_ratio=1.5, scale_steps=-1,
                     upscale_method="bislerp")
    sizes.clear()
    default.spec(exact_denoiser, torch.zeros(1, 4, 8, 8), sigmas, extra_args={},
                 callback=lambda i, x, d, s: sizes.append(tuple(x.shape[-2:])),
                 noise=SeededNoise(1), options=SamplerOptions())
    assert sizes == [(8, 8), (10, 10), (12, 12), (12, 12)]  # len(sigmas) // 2 + 1 = 3 sizes


def run_scheduler(node: type, ctx: NodeContext, **inputs: Any) -> Any:
    return node().execute(ctx, **inputs)


def test_laplace_and_vp_scheduler_nodes(ctx: NodeContext) -> None:
    (sigmas,) = run_scheduler(schedulers.LaplaceScheduler, ctx, steps=5, sigma_max=14.614642,
                              sigma_min=0.0291675, mu=0.0, beta=0.5)
    assert len(sigmas) == 5 and sigmas[0] == pytest.approx(14.614642)
    assert sigmas[2] == pytest.approx(math.exp(0.0))  # the median: log(sigma) = mu
    (sigmas,) = run_scheduler(schedulers.VPScheduler, ctx, steps=3, beta_d=19.9, beta_min=0.1,
                              eps_s=0.001)
    assert sigmas[0] == pytest.approx(math.sqrt(math.expm1(19.9 / 2 + 0.1)), rel=1e-6)
    assert sigmas[-1] == 0 and len(sigmas) == 4


def test_beta_sampling_scheduler_uses_the_models_table(ctx: NodeContext) -> None:
    (sigmas,) = run_scheduler(schedulers.BetaSamplingScheduler, ctx,
                              model=schedule_only_model(), steps=4, alpha=1.0, beta=1.0)
    table = SAMPLING.sigmas
    expected = [float(table[t]) for t in (999, 749, 500, 250)] + [0.0]  # rint(999 * quantile)
    assert sigmas.tolist() == pytest.approx(expected)


def test_table_scheduler_nodes(ctx: NodeContext) -> None:
    (ays,) = run_scheduler(schedulers.AlignYourStepsScheduler, ctx, model_type="SD1", steps=10,
                           denoise=1.0)
    assert ays[1] == pytest.approx(6.4745760956) and ays[-1] == 0 and len(ays) == 11
    (gits,) = run_scheduler(schedulers.GITSScheduler, ctx, coeff=1.0, steps=2, denoise=1.0)
    assert gits.tolist() == pytest.approx([14.61464119, 1.56271636, 0.0])
    (optimal,) = run_scheduler(schedulers.OptimalStepsScheduler, ctx, model_type="FLUX",
                               steps=10, denoise=1.0)
    assert optimal[0] == pytest.approx(0.9968) and optimal[-1] == 0


def test_gits_node_rejects_an_off_grid_coefficient_at_validation(ctx: NodeContext) -> None:
    problem = schedulers.GITSScheduler().validate(ctx, coeff=0.83, steps=10, denoise=1.0)
    assert problem is not None and problem[0] == "coeff" and "0.80, 0.85" in problem[1]
    assert schedulers.GITSScheduler().validate(ctx, coeff=1.15, steps=10, denoise=1.0) is None


def test_split_sigmas_denoise_keeps_the_last_steps_as_the_low_part(ctx: NodeContext) -> None:
    sigmas = torch.tensor([10.0, 6.0, 3.0, 1.0, 0.3, 0.0])
    high, low = schedulers.SplitSigmasDenoise().execute(ctx, sigmas=sigmas, denoise=0.4)
    assert high.tolist() == pytest.approx([10.0, 6.0, 3.0, 1.0])  # round(5 * 0.4) = 2 low steps
    assert low.tolist() == pytest.approx([1.0, 0.3, 0.0])
    high, low = schedulers.SplitSigmasDenoise().execute(ctx, sigmas=sigmas, denoise=0.0)
    assert high.numel() == 0 and low.tolist() == [0.0]  # ComfyUI's result at denoise 0


def test_set_first_sigma_replaces_only_the_first(ctx: NodeContext) -> None:
    sigmas = torch.tensor([14.6, 3.0, 0.0])
    (changed,) = schedulers.SetFirstSigma().execute(ctx, sigmas=sigmas, sigma=136.0)
    assert changed.tolist() == pytest.approx([136.0, 3.0, 0.0]) and sigmas[0] == pytest.approx(
        14.6)
    with pytest.raises(ValueError, match="SetFirstSigma: the sigmas input is empty"):
        schedulers.SetFirstSigma().execute(ctx, sigmas=torch.tensor([]), sigma=1.0)


@pytest.mark.parametrize(("spacing", "curve"), [
    ("linear", lambda u: u), ("cosine", lambda u: math.sin(u * math.pi / 2)),
    ("sine", lambda u: 1 - math.cos(u * math.pi / 2))])
def test_extend_intermediate_sigmas_subdivides_steps_in_range(ctx: NodeContext, spacing: str,
                                                              curve: Any) -> None:
    sigmas = torch.tensor([14.0, 8.0, 2.0, 0.0])
    (extended,) = schedulers.ExtendIntermediateSigmas().execute(
        ctx, sigmas=sigmas, steps=3, start_at_sigma=-1.0, end_at_sigma=5.0, spacing=spacing)
    thirds = [curve(1 / 3), curve(2 / 3)]
    expected = [14.0] + [14.0 + f * (8.0 - 14.0) for f in thirds] \
        + [8.0] + [8.0 + f * (2.0 - 8.0) for f in thirds] + [2.0, 0.0]
    assert extended.tolist() == pytest.approx(expected, rel=1e-6)
    (capped,) = schedulers.ExtendIntermediateSigmas().execute(
        ctx, sigmas=sigmas, steps=2, start_at_sigma=10.0, end_at_sigma=5.0, spacing=spacing)
    assert len(capped) == 5 and capped[2] == pytest.approx(8.0 + curve(0.5) * -6.0)


def test_sampling_percent_to_sigma(ctx: NodeContext) -> None:
    model = schedule_only_model()
    node = schedulers.SamplingPercentToSigma()
    assert node.execute(ctx, model=model, sampling_percent=0.5, return_actual_sigma=False) == (
        SAMPLING.percent_to_sigma(0.5),)
    assert node.execute(ctx, model=model, sampling_percent=0.0,
                        return_actual_sigma=False) == (999999999.9,)
    (first,) = node.execute(ctx, model=model, sampling_percent=0.0, return_actual_sigma=True)
    (last,) = node.execute(ctx, model=model, sampling_percent=1.0, return_actual_sigma=True)
    assert (first, last) == (float(SAMPLING.sigma_max), float(SAMPLING.sigma_min))


def test_manual_sigmas_reads_every_number_in_the_text(ctx: NodeContext) -> None:
    (sigmas,) = schedulers.ManualSigmas().execute(ctx, sigmas="14.6, 7.5;3 .5 +0.25 -1")
    assert sigmas.tolist() == pytest.approx([14.6, 7.5, 3.0, 0.5, 0.25, -1.0])
    with pytest.raises(ValueError, match=r"ManualSigmas: '1..5' in the sigmas text"):
        schedulers.ManualSigmas().execute(ctx, sigmas="1..5")


def test_add_noise_adds_the_schedule_span_of_noise_in_raw_space() -> None:
    model, noise = schedule_only_model(), torch.randn(1, 4, 2, 2)
    latent = torch.full((1, 4, 2, 2), 0.5)
    sigmas = torch.tensor([6.0, 2.0, 1.0])
    noisy = add_noise(model, noise, sigmas, latent)
    assert torch.allclose(noisy, (latent * 0.18215 + 5.0 * noise) / 0.18215, atol=1e-6)
    empty = add_noise(model, noise, torch.tensor([3.0]), torch.zeros(1, 4, 2, 2))
    assert torch.allclose(empty, 3.0 * noise / 0.18215)  # sigmas[0] alone; 0 is not rescaled


def test_dual_cfg_combines_the_three_predictions(monkeypatch: pytest.MonkeyPatch) -> None:
    """regular: N + (M - N) c2 + (P - M) c1; nested: N + c2 (M + (P - M) c1 - N)."""
    p, m, n = torch.full((1,), 3.0), torch.full((1,), 2.0), torch.full((1,), 0.5)
    seen: list[tuple[bool, bool]] = []

    def predict(model: Any, sides: Any, x: Any, sigma: Any, *options: Any) -> list[torch.Tensor]:
        seen.append((sides[0] is not None, sides[1] is not None))
        return [n if sides[0] is not None else torch.zeros(1),
                m if sides[1] is not None else torch.zeros(1), p]

    monkeypatch.setattr(dual_module, "predict", predict)

    def guided(c1: float, c2: float, nested: bool) -> DualGuidedModel:
        return DualGuidedModel(schedule_only_model(), (), (), (), c1, c2, nested)

    x, sigma = torch.zeros(1), torch.ones(1)
    assert float(guided(4.0, 3.0, False)(x, sigma)) == pytest.approx(0.5 + 1.5 * 3 + 1.0 * 4)
    assert float(guided(4.0, 3.0, True)(x, sigma)) == pytest.approx(0.5 + 3 * (2 + 4 - 0.5))
    assert float(guided(1.0, 1.0, False)(x, sigma)) == 3.0 and seen[-1] == (False, False)
    assert float(guided(2.0, 1.0, False)(x, sigma)) == 4.0 and seen[-1] == (False, True)
    guided_x0, uncond = guided(1.0, 1.0, False).with_uncond(x, sigma)
    assert seen[-1] == (True, True) and float(uncond) == 0.5 and float(guided_x0) == 3.0
    assert float(guided(2.0, 3.0, True).with_uncond(x, sigma)[1]) == 2.0  # nested: cond2
