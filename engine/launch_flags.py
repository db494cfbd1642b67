"""ComfyUI's launch flags that main.py's own groups do not declare: the precision flags (with
ComfyUI's meaning, read by memory/devices.DevicePolicy) and every other flag of ComfyUI 0.8's
comfy/cli_args.py, so that users' launch scripts start Loom unchanged. A flag Loom has no use
for is accepted and, when given, reported in one log line saying why it has no effect."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
UNET_PRECISION = (("--fp32-unet", "diffusion model weights and math in fp32 (a 16-bit file is "
                                 "converted at load instead of held as stored)"),
                  ("--fp64-unet", "run the diffusion model in fp64"),
                  ("--bf16-unet", "diffusion model weights in bf16 (on a CPU without native "
                                  "bf16: held in bf16, computed in fp32)"),
                  ("--fp16-unet", "diffusion model weights in fp16 (on the CPU: held in fp16, "
                                  "computed in fp32)"),
                  ("--fp8_e4m3fn-unet", "hold the diffusion model's weights in fp8_e4m3fn "
                                        "(computed in the UNet's dtype)"),
                  ("--fp8_e5m2-unet", "hold the diffusion model's weights in fp8_e5m2"),
                  ("--fp8_e8m0fnu-unet", "hold the diffusion model's weights in fp8_e8m0fnu"))
VAE_PRECISION = (("--fp16-vae", "run the VAE in fp16 (may give black images)"),
                 ("--fp32-vae", "VAE weights and math in fp32 (a 16-bit file is converted "
                                "at load instead of held as stored)"),
                 ("--bf16-vae", "run the VAE in bf16"))
TEXT_PRECISION = (("--fp8_e4m3fn-text-enc", "text encoder weights held in fp8_e4m3fn, "
                                            "computed in fp32"),
                  ("--fp8_e5m2-text-enc", "text encoder weights held in fp8_e5m2, "
                                          "computed in fp32"),
                  ("--fp16-text-enc", "text encoder weights held in fp16, computed in fp32 "
                                      "(ComfyUI's default; with --force-fp32 it reproduces "
                                      "ComfyUI's CPU prompts)"),
                  ("--fp32-text-enc", "text encoder weights and math in fp32 (a 16-bit file "
                                      "is converted at load instead of held as stored)"),
                  ("--bf16-text-enc", "text encoder weights held in bf16, computed in fp32"))


@dataclass(frozen=True)
class InertFlag:
    """A ComfyUI flag accepted for compatibility; `shape` is how it parses: "switch" (no
    value), "value" (one), "optional" (zero or one) or "list" (any number)."""

    flag: str
    shape: str
    reason: str


INERT_FLAGS = (
    InertFlag("--auto-launch", "switch", "Loom does not open a browser; open the printed URL"),
    InertFlag("--disable-auto-launch", "switch", "Loom never opens a browser"),
    InertFlag("--default-device", "value", "pick the GPU with --cuda-device"),
    InertFlag("--cuda-malloc", "switch", "PyTorch's default CUDA allocator is used"),
    InertFlag("--disable-cuda-malloc", "switch", "PyTorch's default CUDA allocator is used"),
    InertFlag("--force-channels-last", "switch",
              "Loom's UNet always runs channels-last"),
    InertFlag("--directml", "optional", "Loom runs on CUDA or the CPU only"),
    InertFlag("--oneapi-device-selector", "value", "Loom runs on CUDA or the CPU only"),
    InertFlag("--disable-ipex-optimize", "switch", "Loom does not use Intel's extension"),
    InertFlag("--supports-fp8-compute", "switch",
              "fp8 weights are always computed in the model's compute dtype"),
    InertFlag("--preview-size", "value", "previews are sent at the latent's size x 8"),
    InertFlag("--use-split-cross-attention", "switch",
              "attention runs through PyTorch's SDPA (or Loom's bf16 CPU kernel)"),
    InertFlag("--use-quad-cross-attention", "switch",
              "attention runs through PyTorch's SDPA (or Loom's bf16 CPU kernel)"),
    InertFlag("--use-pytorch-cross-attention", "switch",
              "attention already runs through PyTorch's SDPA"),
    InertFlag("--use-sage-attention", "switch",
              "attention runs through PyTorch's SDPA (or Loom's bf16 CPU kernel)"),
    InertFlag("--use-flash-attention", "switch",
              "attention runs through PyTorch's SDPA, which picks flash attention itself"),
    InertFlag("--disable-xformers", "switch", "Loom does not use xformers"),
    InertFlag("--force-upcast-attention", "switch",
              "attention is computed by SDPA in the model's dtype"),
    InertFlag("--dont-upcast-attention", "switch",
              "attention is computed by SDPA in the model's dtype"),
    InertFlag("--enable-manager", "switch", "ComfyUI-Manager is not part of Loom"),
    InertFlag("--disable-manager-ui", "switch", "ComfyUI-Manager is not part of Loom"),
    InertFlag("--enable-manager-legacy-ui", "switch", "ComfyUI-Manager is not part of Loom"),
    InertFlag("--async-offload", "optional",
              "weights are copied to the GPU asynchronously from pinned memory already"),
    InertFlag("--disable-async-offload", "switch",
              "Loom's offloading has no synchronous mode"),
    InertFlag("--disable-pinned-memory", "switch",
              "streamed layers always use pinned memory"),
    InertFlag("--force-non-blocking", "switch", "Loom decides where copies may overlap"),
    InertFlag("--default-hashing-function", "value",
              "Loom's caches and uploads use BLAKE2b"),
    InertFlag("--fast", "list", "Loom has no experimental fast paths to switch on"),
    InertFlag("--mmap-torch-files", "switch",
              "pickle files are read through torch.load(weights_only=True)"),
    InertFlag("--disable-mmap", "switch", "safetensors files are always memory-mapped"),
    InertFlag("--dont-print-server", "switch", "use --verbose WARNING for a quieter log"),
    InertFlag("--quick-test-for-ci", "switch", "not needed by Loom's tests"),
    InertFlag("--windows-standalone-build", "switch", "not a Windows standalone build"),
    InertFlag("--disable-api-nodes", "switch", "Loom has no paid-API nodes"),
    InertFlag("--multi-user", "switch", "Loom keeps one user's files"),
    InertFlag("--front-end-version", "value",
              "the editor is the installed comfyui-frontend-package (see --front-end-root)"),
    InertFlag("--enable-compress-response-body", "switch",
              "responses are sent uncompressed"),
    InertFlag("--comfy-api-base", "value", "Loom has no paid-API nodes"),
    InertFlag("--database-url", "value",
              "queue and history live in Loom's SQLite file under the user directory"),
    InertFlag("--disable-assets-autoscan", "switch", "Loom has no asset database"),
    InertFlag("--disable-metadata", "switch",
              "saved files always carry the workflow, as ComfyUI's default"),
)
_PARSE_SHAPES = {"switch": {"action": "store_true"}, "value": {"default": None},
                 "optional": {"nargs": "?", "const": True, "default": None},
                 "list": {"nargs": "*", "default": None}}


def add_precision_flags(parser: argparse.ArgumentParser) -> None:
    """--force-fp32/--force-fp16 and the UNet, VAE and text-encoder precision flags, each group
    mutually exclusive as in ComfyUI."""
    group = parser.add_argument_group("precision (ComfyUI's flags)")
    force = group.add_mutually_exclusive_group()
    force.add_argument("--force-fp32", action="store_true",
                       help="compute in fp32 everywhere (16-bit file weights stay held as "
                            "stored; --fp32-unet/--fp32-text-enc/--fp32-vae convert them)")
    force.add_argument("--force-fp16", action="store_true",
                       help="UNet and text encoders in fp16")
    for flags in (UNET_PRECISION, VAE_PRECISION, TEXT_PRECISION):
        exclusive = group.add_mutually_exclusive_group()
        for flag, text in flags:
            exclusive.add_argument(flag, action="store_true", help=text)
    group.add_argument("--cpu-vae", action="store_true",
                       help="run the VAE on the CPU (in fp32 unless a VAE flag says otherwise)")


def add_inert_flags(parser: argparse.ArgumentParser) -> None:
    """ComfyUI's flags that have no effect in Loom (accepted, reported when given)."""
    group = parser.add_argument_group(
        "accepted for ComfyUI compatibility, without effect in Loom")
    for inert in INERT_FLAGS:
        group.add_argument(inert.flag, help=argparse.SUPPRESS, **_PARSE_SHAPES[inert.shape])


def add_launch_flags(parser: argparse.ArgumentParser) -> None:
    """ComfyUI's other working flags: device choice, determinism, logging, TLS, models dir."""
    group = parser.add_argument_group("process (ComfyUI's flags)")
    group.add_argument("--cuda-device", default=None, metavar="DEVICE_ID",
                       help="the only CUDA device(s) Loom sees (sets CUDA_VISIBLE_DEVICES)")
    group.add_argument("--deterministic", action="store_true",
                       help="make PyTorch pick deterministic algorithms where it has them")
    group.add_argument("--models-directory", default=None, metavar="DIR",
                       help="the models folder (default: BASE/models)")
    group.add_argument("--log-stdout", action="store_true",
                       help="log to stdout instead of stderr")
    group.add_argument("--verbose", nargs="?", const="DEBUG", default=None, choices=LOG_LEVELS,
                       help="log level (no value: DEBUG, with tracebacks)")


def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    tls = parser.add_argument_group("TLS")
    tls.add_argument("--tls-keyfile", default=None, help="TLS key file; needs --tls-certfile")
    tls.add_argument("--tls-certfile", default=None, help="TLS certificate; needs --tls-keyfile")


def inert_flags_given(args: argparse.Namespace) -> list[str]:
    """One line per no-effect flag the user gave, naming it and why it has no effect."""
    lines = []
    for inert in INERT_FLAGS:
        value = getattr(args, _dest(inert.flag), None)
        if value not in (None, False):
            lines.append(f"{inert.flag} has no effect in Loom: {inert.reason}")
    return lines


def settle_flags(args: argparse.Namespace) -> None:
    """Post-parse rules: --verbose becomes a level plus the boolean the code reads; TLS files
    come in pairs; --cuda-device and --deterministic take effect now."""
    args.log_level = args.verbose or "INFO"
    args.verbose = args.log_level == "DEBUG"
    if hasattr(args, "tls_keyfile") and bool(args.tls_keyfile) != bool(args.tls_certfile):
        raise ValueError("--tls-keyfile and --tls-certfile go together: give both files "
                         "(or neither to serve plain HTTP)")
    if args.cuda_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.cuda_device)
    if args.deterministic:
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)


def report_inert_flags(args: argparse.Namespace, log: logging.Logger | None = None) -> None:
    for line in inert_flags_given(args):
        (log or logging.getLogger("loom")).warning("%s", line)


def flag_names(parser: argparse.ArgumentParser) -> set[str]:
    """Every long option `parser` accepts (for tests and documentation)."""
    return {option for action in parser._actions for option in action.option_strings
            if option.startswith("--")}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")

