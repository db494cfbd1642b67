"""Wall time and peak RSS to load a full-size SD1.5 checkpoint (random weights, fp32 on disk)
and run one 512x512 CFG step (UNet batch 2: cond + uncond), Loom against diffusers on the same
file in the same dtype, in one run.

Each side runs in a fresh subprocess, so its peak RSS is its own: Python and torch, the load,
the text encoding and the step (VmHWM; ru_maxrss is reported beside it as a check). Loom loads
as CheckpointLoaderSimple does: the memory-mapped file, the default CPU policy (bf16 UNet and
text encoder where the CPU has native bf16, fp32 VAE), or fp32 with --fp32. diffusers loads as
StableDiffusionPipeline.from_single_file loads each component, with low_cpu_mem_usage=True and
accelerate installed (its users' default): the file read once, models built on the meta device
from the released SD1.5 configs (written to a local folder, as a Hub cache would hold them),
its LDM converters, weights assigned in torch_dtype = Loom's dtype (--other-dtype adds the
other one). Nothing is fetched: the children run with HF_HUB_OFFLINE=1. Both read a warm page
cache (the file was just written or read). Load time runs from opening the file to handles
ready; the tokenizer is built before it on both sides. Loom's load maps the file, so reading
the weights (their first touch) happens in its first step: the headline is load + first step
(`load+step`), and the ratios compare rows of the same dtype only. Both sides encode the two
prompts in two calls, one prompt each: Loom's two CLIPTextEncode nodes, and diffusers'
StableDiffusionPipeline.encode_prompt, which runs its text encoder once for the prompt and once
for the negative prompt. --warm also times a second encoding and a second step (the weights
already read: what a second run costs), so the cold part of each is the difference. GB here
are 2**30 bytes.

Needs diffusers, transformers and accelerate (test-only dependencies), ~4.3 GB of disk and
~10 GB of RAM.
Last line (diffusers = Loom's dtype): `loom_load_s=<float> loom_peak_rss_gb=<float>
diffusers_load_s=<float> diffusers_peak_rss_gb=<float> loom_load_step_s=<float>
diffusers_load_step_s=<float> dtype=<float32|bfloat16>`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.process_tuning import tune_before_torch  # noqa: E402

tune_before_torch()  # as main.py does; both children inherit it

RESULT_PREFIX = "LOAD_STEP_RESULT "
KIB_PER_GIB = 2**20
PROMPTS = ("a photograph of an astronaut riding a horse on the moon", "")  # cond, uncond
TIMESTEP = 999.0
LATENT_SHAPE = (2, 4, 64, 64)  # (cond + uncond, channels, 512 / 8, 512 / 8)
LOOM_OUTPUT = "loom_step.safetensors"
# The released SD1.5 component configs (stable-diffusion-v1-5 unet/vae/text_encoder config.json).
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "attention_head_dim": 8,
    "cross_attention_dim": 768, "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu",
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"),
    "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "center_input_sample": False,
}
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32, "act_fn": "silu",
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "sample_size": 512, "scaling_factor": 0.18215,
}
CLIP_CONFIG: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "DISABLE_TELEMETRY": "1"}


class BenchError(RuntimeError):
    """A child process that failed or a model that did not take the file's weights."""


# ---- measurements (child side) ----------------------------------------------------------

def memory_gb() -> dict[str, float]:
    """This process's resident set now (VmRSS; anonymous and file-backed parts: a memory-mapped
    file's pages count once touched) and at its peak (VmHWM), from /proc."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) / KIB_PER_GIB  # the file gives kB
    return {"rss_gb": fields["VmRSS"], "hwm_gb": fields["VmHWM"],
            "anon_gb": fields["RssAnon"], "file_gb": fields["RssFile"]}


def ru_maxrss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_GIB  # kB on Linux


@contextmanager
def timed(into: dict[str, float], name: str) -> Iterator[None]:
    """Stores the wall seconds the block took as `into[name]`."""
    start = time.perf_counter()
    yield
    into[name] = time.perf_counter() - start


def step_latent() -> Any:
    import torch

    return torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(0))


def finish(times: dict[str, float], before_load: dict[str, float], after_load: dict[str, float],
           extra: dict[str, Any]) -> dict[str, Any]:
    """The child's report: times, and memory before the load, after it and at the end."""
    import torch

    end = memory_gb()
    return {**times, **extra, "threads": torch.get_num_threads(),
            "base_rss_gb": before_load["rss_gb"], "load_rss_gb": after_load["rss_gb"],
            "load_anon_gb": after_load["anon_gb"], "load_file_gb": after_load["file_gb"],
            "load_peak_rss_gb": after_load["hwm_gb"], "peak_rss_gb": end["hwm_gb"],
            "ru_maxrss_gb": ru_maxrss_gb()}


# ---- the three children ----------------------------------------------------------------

def write_child(path: Path) -> dict[str, Any]:
    from engine.diffusion.checkpoints.writer import write_random_checkpoint

    times: dict[str, float] = {}
    with timed(times, "write_s"):
        write_random_checkpoint(path, "sd15", tiny=False)
    return {**times, "bytes": path.stat().st_size}


def loom_child(path: Path, fp32: bool, warm: bool, workdir: Path) -> dict[str, Any]:
    """CheckpointLoaderSimple's load, CLIPTextEncode twice, one UNet call as sampling makes it."""
    import torch
    from safetensors.torch import save_file

    from engine.diffusion.checkpoints.loader import load_checkpoint
    from engine.diffusion.checkpoints.state_files import open_state_file
    from engine.diffusion.memory.devices import DevicePolicy
    from engine.diffusion.patches.patching import patched
    from engine.diffusion.text.tokenizer import BpeCache

    bpe = BpeCache().get()
    policy = DevicePolicy.decide(force_fp32=fp32)
    times: dict[str, float] = {}
    before_load = memory_gb()
    with timed(times, "load_s"):
        loaded = load_checkpoint(open_state_file(path), policy, bpe)
    after_load = memory_gb()
    model, clip = loaded.model, loaded.clip
    if model is None or clip is None or loaded.vae is None:
        raise BenchError(f"{path} loaded without a UNet, CLIP or VAE; expected a full SD1.5 file")
    for name in ("encode_s", "encode_warm_s")[: 1 + warm]:
        with timed(times, name):
            context = torch.cat([clip.encode(prompt).cond for prompt in PROMPTS])  # (2, 77, 768)
    latent, timesteps = step_latent(), torch.full((LATENT_SHAPE[0],), TIMESTEP)
    for name in ("step_s", "step_warm_s")[: 1 + warm]:
        with timed(times, name), torch.no_grad(), patched(model.unet, model.patches):
            output = model.unet(latent, timesteps, context)
    save_file({"output": output.float().contiguous()}, str(workdir / LOOM_OUTPUT))
    return finish(times, before_load, after_load, {"dtype": str(model.dtype).split(".")[-1]})


def diffusers_child(path: Path, dtype_name: str, warm: bool, workdir: Path) -> dict[str, Any]:
    """from_single_file's steps for the UNet, VAE and text encoder, then one UNet call."""
    import torch

    from engine.diffusion.text.tokenizer import BpeCache

    dtype = getattr(torch, dtype_name)
    token_ids = prompt_token_ids(BpeCache().get().encode)
    config = write_diffusers_config(workdir / "diffusers_config")
    times: dict[str, float] = {}
    before_load = memory_gb()
    with timed(times, "load_s"):
        unet, _vae, text_encoder = load_diffusers(path, dtype, config)
    after_load = memory_gb()
    for name in ("encode_s", "encode_warm_s")[: 1 + warm]:
        with timed(times, name), torch.no_grad():  # one call per prompt, as encode_prompt does
            context = torch.cat([text_encoder(ids[None])[0] for ids in token_ids])  # (2, 77, 768)
    latent = step_latent().to(dtype)
    timesteps = torch.full((LATENT_SHAPE[0],), TIMESTEP)
    for name in ("step_s", "step_warm_s")[: 1 + warm]:
        with timed(times, name), torch.no_grad():
            output = unet(latent, timesteps, encoder_hidden_states=context, return_dict=False)[0]
    extra = {"dtype": dtype_name, "max_rel_err_vs_loom": rel_err_vs_loom(output, workdir)}
    return finish(times, before_load, after_load, extra)


def prompt_token_ids(encode: Any) -> Any:
    """(2, 77) ids of PROMPTS as SD1's CLIP-L takes them: start, text, end, end-padded.

    Loom's BPE gives the text's ids (the same as transformers' CLIPTokenizer, which would need
    vocabulary files fetched from the Hub); the tokenizer is not part of what is measured."""
    import torch

    from engine.diffusion.text.tokenizer import CONTEXT_LENGTH, END_TOKEN, START_TOKEN

    rows = []
    for prompt in PROMPTS:
        ids = [START_TOKEN, *encode(prompt)[: CONTEXT_LENGTH - 2], END_TOKEN]
        rows.append(ids + [END_TOKEN] * (CONTEXT_LENGTH - len(ids)))
    return torch.tensor(rows)


def write_diffusers_config(root: Path) -> Path:
    """A local diffusers model folder (unet/, vae/, text_encoder/ config.json) holding the
    released SD1.5 configs: what from_single_file reads from the Hub cache, written here so
    nothing is fetched. Not timed (a user's cache already holds it)."""
    from transformers import CLIPTextConfig

    for subfolder, class_name, config in (("unet", "UNet2DConditionModel", UNET_CONFIG),
                                          ("vae", "AutoencoderKL", VAE_CONFIG)):
        (root / subfolder).mkdir(parents=True, exist_ok=True)
        (root / subfolder / "config.json").write_text(
            json.dumps({"_class_name": class_name, **config}))
    CLIPTextConfig(**CLIP_CONFIG).save_pretrained(str(root / "text_encoder"))
    return root


def load_diffusers(path: Path, dtype: Any, config: Path) -> tuple[Any, Any, Any]:
    """(UNet2DConditionModel, AutoencoderKL, CLIPTextModel) holding the file's weights, loaded
    as StableDiffusionPipeline.from_single_file loads each component: the file read once, each
    model built on the meta device (low_cpu_mem_usage=True, with accelerate) and its weights
    assigned in `dtype`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        create_diffusers_clip_model_from_ldm,
        load_single_file_checkpoint,
    )
    from transformers import CLIPTextModel

    checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    common = {"config": str(config), "torch_dtype": dtype, "local_files_only": True}
    unet = UNet2DConditionModel.from_single_file(checkpoint, subfolder="unet",
                                                 low_cpu_mem_usage=True, **common)
    vae = AutoencoderKL.from_single_file(checkpoint, subfolder="vae", low_cpu_mem_usage=True,
                                         **common)
    text_encoder = create_diffusers_clip_model_from_ldm(CLIPTextModel, checkpoint,
                                                        subfolder="text_encoder", **common)
    del checkpoint  # from_single_file returns without the file's tensors
    for model in (unet, vae, text_encoder):
        unfilled = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
        if unfilled:  # the bench would be void
            raise BenchError(f"{type(model).__name__} got no weights for {len(unfilled)} "
                             f"tensors (e.g. {unfilled[:3]}); the file is not a full SD1.5 "
                             f"checkpoint or the config above does not match it")
    return unet.eval(), vae.eval(), text_encoder.eval()


def rel_err_vs_loom(output: Any, workdir: Path) -> float:
    """max |diffusers - loom| / max |loom| over the step's output (nan without a Loom run)."""
    from safetensors.torch import load_file

    saved = workdir / LOOM_OUTPUT
    if not saved.exists():
        return math.nan
    loom = load_file(str(saved))["output"]
    return ((output.float() - loom).abs().max() / loom.abs().max()).item()


# ---- the parent: runs the children, prints the table -----------------------------------

def run_child(role: str, *arguments: str) -> dict[str, Any]:
    """Runs this script as a `role` child and returns the JSON it reports."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", role, *arguments]
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False,
                               env={**os.environ, **OFFLINE_ENV})
    results = []
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            results.append(json.loads(line[len(RESULT_PREFIX):]))
        else:
            print(line)
    if completed.returncode != 0 or not results:
        raise BenchError(f"the {role} child exited with status {completed.returncode} and "
                         f"{len(results)} results; its error is printed above")
    return results[-1]


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}" if denominator else "-"


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    print(f"{'side':<16}{'dtype':>9}{'load s':>9}{'encode s':>10}{'step s':>9}"
          f"{'load+step s':>13}{'peak RSS GB':>13}{'ru_maxrss':>11}{'loaded anon':>13}"
          f"{'+ file':>8}{'rel err':>10}")
    for name, row in rows.items():
        err = row.get("max_rel_err_vs_loom")
        print(f"{name:<16}{row['dtype']:>9}{row['load_s']:>9.2f}{row['encode_s']:>10.2f}"
              f"{row['step_s']:>9.2f}{row['load_s'] + row['step_s']:>13.2f}"
              f"{row['peak_rss_gb']:>13.2f}{row['ru_maxrss_gb']:>11.2f}"
              f"{row['load_anon_gb']:>13.2f}{row['load_file_gb']:>8.2f}"
              f"{'-' if err is None else f'{err:.1e}':>10}")
        if "step_warm_s" in row:
            print(f"{name:<16}warm (second) encode {row['encode_warm_s']:.2f} s, step "
                  f"{row['step_warm_s']:.2f} s")
    loom = rows["loom"]
    for name, row in rows.items():
        if name != "loom" and row["dtype"] == loom["dtype"]:  # like with like only
            print(f"loom / {name} ({row['dtype']}): load+step "
                  f"{ratio(load_step(loom), load_step(row))}, "
                  f"load {ratio(loom['load_s'], row['load_s'])}, "
                  f"encode {ratio(loom['encode_s'], row['encode_s'])}, "
                  f"step {ratio(loom['step_s'], row['step_s'])}, "
                  f"peak RSS {ratio(loom['peak_rss_gb'], row['peak_rss_gb'])}")


def load_step(row: dict[str, Any]) -> float:
    """Load plus the first step: the headline, since Loom's load maps the file and its first
    step reads (first-touches) the weights, where diffusers' load reads them all."""
    return row["load_s"] + row["step_s"]


def run_bench(args: argparse.Namespace, checkpoint: Path, workdir: Path) -> None:
    print(f"load average before: {load_average()} ({os.cpu_count()} CPUs)")
    if not checkpoint.exists():
        written = run_child("write", "--checkpoint", str(checkpoint))
        print(f"wrote {checkpoint} ({written['bytes'] / 2**30:.2f} GB) in "
              f"{written['write_s']:.1f} s")
    common = ("--checkpoint", str(checkpoint), "--workdir", str(workdir))
    common += ("--warm",) if args.warm else ()
    rows = {"loom": run_child("loom", *common, *(("--fp32",) if args.fp32 else ()))}
    dtypes = [rows["loom"]["dtype"]]  # diffusers in Loom's dtype: the like-for-like row
    dtypes += [other for other in ("float32", "bfloat16") if other not in dtypes
               and args.other_dtype]
    if not args.skip_diffusers:
        for dtype in dtypes:
            name = "diffusers" if dtype == dtypes[0] else f"diffusers_{dtype}"
            rows[name] = run_child("diffusers", *common, "--dtype", dtype)
    print(f"load average after: {load_average()}; torch threads per side: "
          f"{rows['loom']['threads']}; 'loaded anon + file': RSS once loaded, anonymous and "
          f"file-backed (mapped file pages); 'rel err': step output against Loom's")
    print_table(rows)
    reference = rows.get("diffusers", {"load_s": math.nan, "step_s": math.nan,
                                       "peak_rss_gb": math.nan})
    print(f"loom_load_s={rows['loom']['load_s']:.3f} "
          f"loom_peak_rss_gb={rows['loom']['peak_rss_gb']:.3f} "
          f"diffusers_load_s={reference['load_s']:.3f} "
          f"diffusers_peak_rss_gb={reference['peak_rss_gb']:.3f} "
          f"loom_load_step_s={load_step(rows['loom']):.3f} "
          f"diffusers_load_step_s={load_step(reference):.3f} dtype={dtypes[0]}")


def parent(args: argparse.Namespace) -> None:
    """Writes the checkpoint unless given one, runs the sides, deletes what it wrote."""
    workdir = Path(tempfile.mkdtemp(prefix="loom_load_step_"))
    checkpoint = args.checkpoint or workdir / "sd15_random_full.safetensors"
    wrote_checkpoint = not checkpoint.exists()
    try:
        run_bench(args, checkpoint, workdir)
    finally:
        if args.keep:
            print(f"kept {checkpoint}")
        elif wrote_checkpoint:
            checkpoint.unlink(missing_ok=True)
        if not (args.keep and checkpoint.parent == workdir):
            shutil.rmtree(workdir, ignore_errors=True)


def child(args: argparse.Namespace) -> None:
    if args.child == "write":
        result = write_child(args.checkpoint)
    elif args.child == "loom":
        result = loom_child(args.checkpoint, args.fp32, args.warm, args.workdir)
    else:
        result = diffusers_child(args.checkpoint, args.dtype, args.warm, args.workdir)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="use this SD1.5 .safetensors file "
                        "(written there first if missing) instead of a temporary one")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    parser.add_argument("--fp32", action="store_true", help="Loom in fp32 (--force-fp32)")
    parser.add_argument("--skip-diffusers", action="store_true", help="Loom only")
    parser.add_argument("--warm", action="store_true", help="also time a second encoding and "
                        "a second step on each side (weights already read)")
    parser.add_argument("--other-dtype", action="store_true",
                        help="also diffusers in the dtype Loom did not use (bf16 is emulated "
                        "and very slow on CPUs without AVX512-BF16)")
    parser.add_argument("--child", choices=("write", "loom", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
