"""Seeded noise identical to ComfyUI's, drawn without touching torch's global RNG."""

from __future__ import annotations

import builtins
import math

import numpy
import pytest
import torch

from engine.diffusion.sampling import (
    SeededNoise,
    StepNoise,
    initial_noise,
    random_inpaint_noise,
)

# torch.manual_seed(0); torch.randn(1, 4, 8, 8).flatten()[:8], as ComfyUI draws seed 0.
SEED_0_FIRST_VALUES = [
    -1.1258398294448853, -1.152360200881958, -0.2505785822868347, -0.4338788092136383,
    0.8487103581428528, 0.6920091509819031, -0.31601276993751526, -2.1152193546295166,
]  # fmt: skip


def mt19937_box_muller(seed: int, count: int) -> numpy.ndarray:
    """torch's CPU randn rebuilt from its parts: MT19937 seeded by init_genrand(seed) (numpy's
    legacy RandomState), 24-bit uniforms, and Box-Muller on blocks of 16 (u1 = 1 - u[j],
    u2 = u[j + 8])."""
    words = numpy.random.RandomState(seed).randint(0, 2**32, size=count, dtype=numpy.uint64)
    uniform = (words & (2**24 - 1)).astype(numpy.float64) * 2.0**-24
    normal = numpy.empty(count)
    for block in range(0, count, 16):
        radius = numpy.sqrt(-2 * numpy.log(1 - uniform[block : block + 8]))
        theta = 2 * math.pi * uniform[block + 8 : block + 16]
        normal[block : block + 8] = radius * numpy.cos(theta)
        normal[block + 8 : block + 16] = radius * numpy.sin(theta)
    return normal


def test_initial_noise_for_seed_0_is_torch_randn_from_a_cpu_generator() -> None:
    noise = initial_noise(torch.zeros(1, 4, 8, 8), 0)
    assert noise.dtype == torch.float32 and noise.shape == (1, 4, 8, 8)
    assert noise.flatten()[:8].tolist() == SEED_0_FIRST_VALUES
    rebuilt = mt19937_box_muller(0, 256)
    numpy.testing.assert_allclose(noise.flatten().numpy(), rebuilt, atol=2e-6)


def test_initial_noise_is_drawn_in_float32_then_cast_to_the_latent_dtype() -> None:
    half = initial_noise(torch.zeros(1, 4, 8, 8, dtype=torch.float16), 0)
    assert half.dtype == torch.float16
    assert torch.equal(half, initial_noise(torch.zeros(1, 4, 8, 8), 0).half())


def test_initial_noise_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    initial_noise(torch.zeros(2, 4, 8, 8), 99)
    SeededNoise(99).gaussian(torch.zeros(2, 3))(torch.tensor(1.0), torch.tensor(0.5))
    assert torch.equal(torch.rand(3), expected)


def test_batch_index_draws_every_index_up_to_the_largest_and_picks_the_listed_ones() -> None:
    latent = torch.zeros(3, 4, 8, 8)
    generator = torch.Generator().manual_seed(7)
    per_index = [torch.randn(1, 4, 8, 8, generator=generator) for _ in range(6)]
    picked = initial_noise(latent, 7, batch_index=[5, 2, 2])
    assert torch.equal(picked, torch.cat([per_index[5], per_index[2], per_index[2]]))


def test_a_latent_taken_from_a_batch_gets_the_noise_it_had_in_the_batch() -> None:
    full = initial_noise(torch.zeros(4, 4, 8, 8), 123)
    single = initial_noise(torch.zeros(1, 4, 8, 8), 123, batch_index=[3])
    assert torch.equal(single[0], full[3])


def test_batch_index_must_be_non_negative() -> None:
    with pytest.raises(ValueError, match="batch_index"):
        initial_noise(torch.zeros(1, 4, 8, 8), 0, batch_index=[-1])


def test_ancestral_step_noise_on_cpu_comes_from_seed_plus_one() -> None:
    x = torch.zeros(2, 4, 8, 8)
    draw = SeededNoise(41).gaussian(x)
    generator = torch.Generator().manual_seed(42)
    first = torch.randn(2, 4, 8, 8, generator=generator)
    second = torch.randn(2, 4, 8, 8, generator=generator)
    sigma, sigma_next = torch.tensor(2.0), torch.tensor(1.0)
    assert torch.equal(draw(sigma, sigma_next), first)
    assert torch.equal(draw(sigma, sigma_next), second)


def test_each_sampling_run_gets_a_fresh_stream() -> None:
    x = torch.zeros(1, 8)
    source = SeededNoise(5)
    one, two = source.gaussian(x), source.gaussian(x)
    assert torch.equal(one(x[0, 0], x[0, 0]), two(x[0, 0], x[0, 0]))


def test_ddim_inpaint_noise_is_seed_plus_one_randn_on_the_cpu() -> None:
    noise = torch.zeros(1, 4, 8, 8, dtype=torch.float16)
    expected = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11)).half()
    assert torch.equal(random_inpaint_noise(noise, 10), expected)


def brownian(seed: int, x: torch.Tensor, tree_on_cpu: bool = True) -> StepNoise:
    low, high = torch.tensor(0.03), torch.tensor(14.6)
    return SeededNoise(seed).brownian(x, low, high, tree_on_cpu=tree_on_cpu)


def test_brownian_noise_is_torchsde_tree_increments_over_root_dt() -> None:
    torchsde = pytest.importorskip("torchsde")
    x = torch.zeros(1, 4, 4, 4)
    sigma, sigma_next = torch.tensor(3.0), torch.tensor(2.0)
    low, high = torch.tensor(0.03), torch.tensor(14.6)
    tree = torchsde.BrownianTree(low, torch.zeros_like(x), high, entropy=9)
    expected = -tree(sigma_next, sigma) / math.sqrt(1.0)
    assert torch.equal(brownian(9, x)(sigma, sigma_next), expected)


def test_brownian_increments_are_consistent_and_unit_variance() -> None:
    pytest.importorskip("torchsde")
    x = torch.zeros(1, 20000)
    a, b, c = torch.tensor(8.0), torch.tensor(2.0), torch.tensor(0.5)
    noise = brownian(3, x)
    whole = noise(a, c) * math.sqrt(7.5)
    parts = noise(a, b) * math.sqrt(6.0) + noise(b, c) * math.sqrt(1.5)
    assert torch.allclose(whole, parts, atol=1e-4)
    assert float(noise(a, b).std()) == pytest.approx(1.0, abs=0.03)
    assert torch.equal(brownian(3, x)(a, b), brownian(3, x)(a, b))
    assert not torch.equal(brownian(4, x)(a, b), brownian(3, x)(a, b))


def test_brownian_tree_on_device_equals_the_cpu_tree_for_cpu_latents() -> None:
    pytest.importorskip("torchsde")
    x = torch.zeros(1, 4, 4, 4)
    sigma, sigma_next = torch.tensor(5.0), torch.tensor(4.0)
    on_device, on_cpu = brownian(1, x, False), brownian(1, x, True)
    assert torch.equal(on_device(sigma, sigma_next), on_cpu(sigma, sigma_next))


def test_missing_torchsde_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def without_torchsde(name: str, *args: object, **kwargs: object) -> object:
        if name == "torchsde":
            raise ModuleNotFoundError("No module named 'torchsde'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_torchsde)
    with pytest.raises(ModuleNotFoundError, match="pip install torchsde"):
        brownian(0, torch.zeros(1, 4))
