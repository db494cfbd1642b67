"""Seconds per UNet step, random weights, CFG batch 2, 77 context tokens: full-size SD1.5 at
512x512 (latent 64x64), Loom against diffusers' UNet2DConditionModel on the same weights, like
with like, and the FLOP floor of each dtype; or, with --sdxl, the SDXL base UNet at 1024x1024
(latent 128x128) against its floor.

Rows (SD1.5), timed in phases; the two models are converted in place between phases, so at
most two UNets are resident (~7 GB in fp32):
  fp32, NCHW            loom_fp32_nchw, diffusers_fp32_nchw (only with --nchw)
  fp32, channels_last   loom_fp32, diffusers_fp32
  bf16, channels_last   loom_bf16, diffusers_bf16 (only with native bf16, or --bf16)
diffusers runs with PyTorch SDPA attention (AttnProcessor2_0) in every row: the best a
diffusers user gets on a CPU. `loom` is Loom's default CPU dtype (bf16 where the CPU has
AVX512-BF16 or AMX, fp32 elsewhere). Each floor is the step's FLOPs over this machine's best
matmul rate in that dtype; on a CPU without native bf16, bf16 matmuls are emulated (well under
1 GFLOP/s on an AVX2 EPYC): the bf16 rows and floor are then skipped and printed as nan.

Target: loom_s <= 1.3 x its dtype's floor.
The machine may be shared: within a phase, steps are interleaved round-robin and the best of
each is kept; the spread is printed. Needs diffusers (test-only dependency).
Last line: `loom_s=<float> loom_fp32_s=<float> diffusers_fp32_s=<float> floor_bf16_s=<float>
diffusers_bf16_s=<float> loom_bf16_s=<float> floor_fp32_s=<float> loom_fp32_nchw_s=<float>
diffusers_fp32_nchw_s=<float>` (fp32 rows channels_last unless named nchw); with --sdxl:
`loom_sdxl_s=<float> floor_sdxl_s=<float>` (the floor in Loom's dtype).
"""

from __future__ import annotations

import argparse
import math
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

BATCH, TOKENS = 2, 77
Step = Callable[[], torch.Tensor]


def native_bf16() -> bool:
    """AVX512-BF16 or AMX on x86 (the CPU features the bf16 kernels of oneDNN use)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def step_inputs(config: UNetConfig, latent: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "x": torch.randn(BATCH, config.in_channels, latent, latent, generator=generator),
        "timesteps": torch.tensor([500.0] * BATCH),
        "context": torch.randn(BATCH, TOKENS, config.context_dim, generator=generator),
    }
    if config.adm_in_channels is not None:  # SDXL's vector conditioning
        inputs["y"] = torch.randn(BATCH, config.adm_in_channels, generator=generator)
    return {name: value.to(device) for name, value in inputs.items()}


def step_flops(config: UNetConfig, latent: int) -> int:
    """FLOPs of one forward (matmuls, convs, attention), counted on the meta device."""
    with torch.device("meta"):
        model = UNet(config)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**step_inputs(config, latent, "meta"))
    return counter.get_total_flops()


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 4096),
                repeats: int = 6) -> float:
    """Best FLOP/s in `dtype` over large square matmuls."""
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        a @ b
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def diffusers_unet(loom: UNet, config: UNetConfig, latent: int) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel for an SD1-family `config`, with loom's weights and SDPA
    attention."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from diffusers.models.attention_processor import AttnProcessor2_0

    if config.num_heads is None or config.adm_in_channels is not None:
        raise ValueError(f"diffusers_unet takes an SD1-family UNetConfig; got {config}; use "
                         "--sdxl without diffusers for SDXL")
    levels = len(config.channel_mult)
    attention = [depth > 0 for depth in config.transformer_depth]
    reference = UNet2DConditionModel(
        sample_size=latent, in_channels=config.in_channels, out_channels=config.out_channels,
        layers_per_block=config.num_res_blocks, cross_attention_dim=config.context_dim,
        attention_head_dim=config.num_heads,  # diffusers' SD1 configs name the head count so
        block_out_channels=tuple(config.model_channels * mult for mult in config.channel_mult),
        down_block_types=tuple("CrossAttnDownBlock2D" if on else "DownBlock2D"
                               for on in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if on else "UpBlock2D"
                             for on in reversed(attention)),
    )
    checkpoint = {CHECKPOINT_PREFIX + key: value for key, value in loom.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, {"layers_per_block": config.num_res_blocks})
    missing, unexpected = reference.load_state_dict(converted, strict=False)
    if missing or unexpected or levels != len(reference.down_blocks):
        raise RuntimeError(f"diffusers' UNet did not take Loom's weights: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}; the config mapping above is wrong")
    reference.set_attn_processor(AttnProcessor2_0())
    return reference.eval()


def time_round_robin(steps: dict[str, Step], rounds: int,
                     ) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """Runs each step once per round (after one warm-up each); wall seconds of every run."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    outputs = {name: step() for name, step in steps.items()}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times, outputs


def sd15_phases(config: UNetConfig, latent: int, rounds: int, bf16: bool, nchw: bool,
                ) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """The SD1.5 rows, phase by phase (NCHW fp32 if `nchw`, channels_last fp32, channels_last
    bf16 if `bf16`); each phase's best times are printed as it ends."""
    torch.manual_seed(0)
    loom = UNet(config).eval()
    reference = diffusers_unet(loom, config, latent)
    inputs = step_inputs(config, latent)

    times: dict[str, list[float]] = {}
    outputs: dict[str, torch.Tensor] = {}
    phases = [("_nchw", torch.float32, torch.contiguous_format)] if nchw else []
    phases += [("", torch.float32, torch.channels_last)]
    phases += [("", torch.bfloat16, torch.channels_last)] if bf16 else []
    with torch.inference_mode():
        for suffix, dtype, memory_format in phases:
            loom.to(dtype=dtype, memory_format=memory_format)  # in place: one copy each
            reference.to(dtype=dtype, memory_format=memory_format)
            inputs_now = {**inputs, "context": inputs["context"].to(dtype),
                          "x": inputs["x"].to(dtype=dtype, memory_format=memory_format)}
            name = "fp32" if dtype == torch.float32 else "bf16"
            phase_times, phase_outputs = time_round_robin({
                f"loom_{name}{suffix}": lambda now=inputs_now: loom(**now),
                f"diffusers_{name}{suffix}": lambda now=inputs_now: reference(
                    now["x"], now["timesteps"], now["context"], return_dict=False)[0],
            }, rounds)
            times |= phase_times
            outputs |= phase_outputs
            print("phase done, best s: " + ", ".join(
                f"{name} {min(runs):.3f}" for name, runs in phase_times.items()), flush=True)
    return times, outputs


def sdxl_phase(config: UNetConfig, latent: int, rounds: int, dtype: torch.dtype,
               ) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """Loom's SDXL UNet in `dtype`, channels_last: the only model resident (10.3 GB in fp32)."""
    torch.manual_seed(0)
    loom = UNet(config).eval().to(dtype=dtype, memory_format=torch.channels_last)
    inputs = step_inputs(config, latent)
    inputs = {**inputs, "x": inputs["x"].to(dtype=dtype, memory_format=torch.channels_last),
              "context": inputs["context"].to(dtype), "y": inputs["y"].to(dtype)}
    with torch.inference_mode():
        return time_round_robin({"loom_sdxl": lambda: loom(**inputs)}, rounds)


def rel_err(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).abs().max() / reference.abs().max()).item()


def print_rows(times: dict[str, list[float]], flops: int, floors: dict[str, float]) -> None:
    """One line per row: best, median and worst seconds, ratio to its dtype's floor."""
    print(f"{'variant':<22}{'best s':>9}{'median s':>10}{'worst s':>9}{'x floor':>9}"
          f"{'GFLOP/s':>9}")
    for name, runs in times.items():
        best = min(runs)
        floor = floors["bf16" if "bf16" in name else "fp32"]
        print(f"{name:<22}{best:>9.3f}{sorted(runs)[len(runs) // 2]:>10.3f}{max(runs):>9.3f}"
              f"{best / floor:>9.2f}{flops / best / 1e9:>9.0f}")


def print_header(flops: int, peaks: dict[str, float], dtype: torch.dtype) -> dict[str, float]:
    """CPU, FLOPs, peaks and floors; returns the floor seconds per dtype (nan if unmeasured)."""
    floors = {name: flops / peak if peak else math.nan for name, peak in peaks.items()}
    print(f"cpu: {torch.backends.cpu.get_cpu_capability()}, native bf16: {native_bf16()}, "
          f"threads: {torch.get_num_threads()}, loom dtype: {dtype}")
    print(f"step FLOPs: {flops / 1e12:.3f} T; " + "; ".join(
        f"{name} matmul peak {peaks[name] / 1e9:.0f} GFLOP/s, floor {floors[name]:.3f} s"
        if peaks[name] else f"{name}: not measured (no native {name} on this CPU; --bf16)"
        for name in peaks))
    return floors


def ratios(best: dict[str, float]) -> None:
    """Loom against diffusers in the same dtype and memory format."""
    for suffix in ("fp32_nchw", "fp32", "bf16"):
        if f"loom_{suffix}" in best:
            print(f"loom_{suffix} / diffusers_{suffix}: "
                  f"{best[f'loom_{suffix}'] / best[f'diffusers_{suffix}']:.2f}")


def report_sd15(times: dict[str, list[float]], outputs: dict[str, torch.Tensor], flops: int,
                peaks: dict[str, float], dtype: torch.dtype) -> None:
    floors = print_header(flops, peaks, dtype)
    print_rows(times, flops, floors)
    best = {name: min(runs) for name, runs in times.items()}
    ratios(best)
    reference = outputs["diffusers_fp32"]
    print("max rel err vs diffusers_fp32: " + ", ".join(
        f"{name} {rel_err(output, reference):.2e}" for name, output in outputs.items()
        if name != "diffusers_fp32"))
    default = "bf16" if dtype == torch.bfloat16 else "fp32"
    keys = {"loom_s": best[f"loom_{default}"], "loom_fp32_s": best["loom_fp32"],
            "diffusers_fp32_s": best["diffusers_fp32"], "floor_bf16_s": floors["bf16"],
            "diffusers_bf16_s": best.get("diffusers_bf16", math.nan),
            "loom_bf16_s": best.get("loom_bf16", math.nan), "floor_fp32_s": floors["fp32"],
            "loom_fp32_nchw_s": best.get("loom_fp32_nchw", math.nan),
            "diffusers_fp32_nchw_s": best.get("diffusers_fp32_nchw", math.nan)}
    print(" ".join(f"{key}={value:.4f}" for key, value in keys.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per variant")
    parser.add_argument("--sdxl", action="store_true",
                        help="SDXL base UNet at 1024x1024, Loom against its floor (~11 GB in fp32)")
    parser.add_argument("--bf16", action="store_true", help="run the bf16 rows and floor even "
                        "without native bf16 (emulated: hours per full-size step on AVX2)")
    parser.add_argument("--nchw", action="store_true", help="also both fp32 in NCHW (two "
                        "more models' worth of steps)")
    parser.add_argument("--tiny", action="store_true", help="a ~2M-parameter stand-in of the "
                        "same family and 1/8 the latent, to check the code path (not a figure)")
    args = parser.parse_args()

    bf16 = args.bf16 or native_bf16()
    dtype = torch.bfloat16 if native_bf16() else torch.float32
    family = UNetFamily.SDXL if args.sdxl else UNetFamily.SD1
    config = (UNetConfig.tiny if args.tiny else UNetConfig.preset)(family)
    latent = (128 if args.sdxl else 64) // (8 if args.tiny else 1)
    peak_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    measure = {"fp32": True, "bf16": bf16}
    peaks = {name: matmul_peak(peak_dtypes[name]) if measure[name] else 0.0 for name in measure}
    if args.sdxl:
        times, _outputs = sdxl_phase(config, latent, args.rounds, dtype)
    else:
        times, outputs = sd15_phases(config, latent, args.rounds, bf16, args.nchw)
    peaks = {name: max(peak, matmul_peak(peak_dtypes[name])) if peak else 0.0
             for name, peak in peaks.items()}
    flops = step_flops(config, latent)
    if args.sdxl:
        report_sdxl(times, flops, peaks, dtype)
    else:
        report_sd15(times, outputs, flops, peaks, dtype)


def report_sdxl(times: dict[str, list[float]], flops: int, peaks: dict[str, float],
                dtype: torch.dtype) -> None:
    floors = print_header(flops, peaks, dtype)
    floor = floors["bf16" if dtype == torch.bfloat16 else "fp32"]
    suffix = "bf16" if dtype == torch.bfloat16 else "fp32"
    print_rows({f"{name}_{suffix}": runs for name, runs in times.items()}, flops, floors)
    print(f"loom_sdxl_s={min(times['loom_sdxl']):.4f} floor_sdxl_s={floor:.4f}")


if __name__ == "__main__":
    main()
