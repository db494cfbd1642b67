"""Seconds per UNet step, full-size SD1.5 with random weights, 512x512 (latent 64x64), CFG batch 2,
77 context tokens: Loom in its default CPU dtype (bf16 where the CPU has native bf16) and in
fp32, against diffusers' UNet2DConditionModel in fp32 on the same weights; plus the FLOP floor
(the step's FLOPs over this machine's best bf16 matmul rate).

Target: loom_s <= 1.3 x floor_bf16_s.
The machine may be shared: steps are interleaved round-robin and the best of each is kept; the
spread is printed. Needs diffusers (test-only dependency) and ~9 GB of RAM.
Last line: `loom_s=<float> loom_fp32_s=<float> diffusers_fp32_s=<float> floor_bf16_s=<float>`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.process_tuning import tune_before_torch  # noqa: E402

tune_before_torch()  # as main.py does; diffusers runs in this process under the same setting

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from engine.diffusion.networks.unet import CHECKPOINT_PREFIX, UNet, UNetConfig, UNetFamily  # noqa: E402

BATCH, LATENT, TOKENS = 2, 64, 77


def native_bf16() -> bool:
    """AVX512-BF16 or AMX on x86 (the CPU features the bf16 kernels of oneDNN use)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def step_inputs(config: UNetConfig, device: str = "cpu") -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(BATCH, config.in_channels, LATENT, LATENT, generator=generator).to(device),
        "timesteps": torch.tensor([500.0] * BATCH, device=device),
        "context": torch.randn(BATCH, TOKENS, config.context_dim, generator=generator).to(device),
    }


def step_flops(config: UNetConfig) -> int:
    """FLOPs of one forward (matmuls, convs, attention), counted on the meta device."""
    with torch.device("meta"):
        model = UNet(config)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**step_inputs(config, "meta"))
    return counter.get_total_flops()


def matmul_peak(sizes: tuple[int, ...] = (1024, 2048, 4096), repeats: int = 6) -> float:
    """Best bf16 FLOP/s over large square matmuls."""
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, dtype=torch.bfloat16)
        b = torch.randn(size, size, dtype=torch.bfloat16)
        a @ b
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def diffusers_sd15(loom: UNet) -> torch.nn.Module:
    """diffusers' SD1.5 UNet (its defaults are SD1's bar the 768-wide context), loom's weights."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    checkpoint = {CHECKPOINT_PREFIX + key: value for key, value in loom.state_dict().items()}
    reference = UNet2DConditionModel(cross_attention_dim=768, sample_size=LATENT)
    reference.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, {"layers_per_block": 2}))
    return reference.eval()


def time_round_robin(steps: dict[str, Callable[[], torch.Tensor]],
                     rounds: int) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """Runs each step once per round (after one warm-up each); wall seconds of every run."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    outputs = {name: step() for name, step in steps.items()}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per variant")
    args = parser.parse_args()

    dtype = torch.bfloat16 if native_bf16() else torch.float32
    config = UNetConfig.preset(UNetFamily.SD1)
    torch.manual_seed(0)
    loom_fp32 = UNet(config).eval()
    loom = UNet(config).eval()
    loom.load_state_dict(loom_fp32.state_dict())
    loom.to(dtype=dtype, memory_format=torch.channels_last)
    loom_fp32.to(memory_format=torch.channels_last)
    reference = diffusers_sd15(loom_fp32)
    inputs = step_inputs(config)

    peak_before = matmul_peak()
    with torch.inference_mode():
        times, outputs = time_round_robin({
            "loom": lambda: loom(**inputs),
            "loom_fp32": lambda: loom_fp32(**inputs),
            "diffusers_fp32": lambda: reference(inputs["x"], inputs["timesteps"],
                                                inputs["context"], return_dict=False)[0],
        }, args.rounds)
    peak = max(peak_before, matmul_peak())
    flops = step_flops(config)
    report(times, outputs, flops, peak, dtype)


def rel_err(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).abs().max() / reference.abs().max()).item()


def report(times: dict[str, list[float]], outputs: dict[str, torch.Tensor], flops: int,
           peak: float, dtype: torch.dtype) -> None:
    best = {name: min(runs) for name, runs in times.items()}
    floor = flops / peak
    print(f"cpu: {torch.backends.cpu.get_cpu_capability()}, native bf16: {native_bf16()}, "
          f"threads: {torch.get_num_threads()}, loom dtype: {dtype}")
    print(f"step FLOPs: {flops / 1e12:.3f} T; bf16 matmul peak: {peak / 1e9:.0f} GFLOP/s; "
          f"floor: {floor:.3f} s")
    print(f"{'variant':<16}{'best s':>9}{'median s':>10}{'worst s':>9}{'x floor':>9}"
          f"{'GFLOP/s':>9}")
    for name, runs in times.items():
        median = sorted(runs)[len(runs) // 2]
        print(f"{name:<16}{best[name]:>9.3f}{median:>10.3f}{max(runs):>9.3f}"
              f"{best[name] / floor:>9.2f}{flops / best[name] / 1e9:>9.0f}")
    reference = outputs["diffusers_fp32"]
    print(f"max rel err vs diffusers fp32: loom {rel_err(outputs['loom'], reference):.2e}, "
          f"loom_fp32 {rel_err(outputs['loom_fp32'], reference):.2e}")
    print(f"loom_s={best['loom']:.4f} loom_fp32_s={best['loom_fp32']:.4f} "
          f"diffusers_fp32_s={best['diffusers_fp32']:.4f} floor_bf16_s={floor:.4f}")


if __name__ == "__main__":
    main()
