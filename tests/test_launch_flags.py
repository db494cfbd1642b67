"""ComfyUI's launch flags: every one parses, the precision flags keep ComfyUI's meaning, and the
flags Loom has no use for say so in one line each."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch

from engine.diffusion.memory.devices import DevicePolicy
from engine.launch_flags import INERT_FLAGS, flag_names, inert_flags_given, settle_flags
from main import build_parser

# Every flag of ComfyUI 0.8's comfy/cli_args.py (a recorded fact, not code).
COMFYUI_FLAGS = (
    "--listen", "--port", "--tls-keyfile", "--tls-certfile", "--enable-cors-header",
    "--max-upload-size", "--base-directory", "--extra-model-paths-config", "--output-directory",
    "--temp-directory", "--input-directory", "--models-directory", "--auto-launch",
    "--disable-auto-launch", "--cuda-device", "--default-device", "--cuda-malloc",
    "--disable-cuda-malloc", "--force-fp32", "--force-fp16", "--fp32-unet", "--fp64-unet",
    "--bf16-unet", "--fp16-unet", "--fp8_e4m3fn-unet", "--fp8_e5m2-unet", "--fp8_e8m0fnu-unet",
    "--fp16-vae", "--fp32-vae", "--bf16-vae", "--cpu-vae", "--fp8_e4m3fn-text-enc",
    "--fp8_e5m2-text-enc", "--fp16-text-enc", "--fp32-text-enc", "--bf16-text-enc",
    "--force-channels-last", "--directml", "--oneapi-device-selector", "--disable-ipex-optimize",
    "--supports-fp8-compute", "--preview-method", "--preview-size", "--cache-classic",
    "--cache-lru", "--cache-none", "--cache-ram", "--use-split-cross-attention",
    "--use-quad-cross-attention", "--use-pytorch-cross-attention", "--use-sage-attention",
    "--use-flash-attention", "--disable-xformers", "--force-upcast-attention",
    "--dont-upcast-attention", "--enable-manager", "--disable-manager-ui",
    "--enable-manager-legacy-ui", "--gpu-only", "--highvram", "--normalvram", "--lowvram",
    "--novram", "--cpu", "--reserve-vram", "--async-offload", "--disable-async-offload",
    "--force-non-blocking", "--default-hashing-function", "--disable-smart-memory",
    "--deterministic", "--fast", "--disable-pinned-memory", "--mmap-torch-files",
    "--disable-mmap", "--dont-print-server", "--quick-test-for-ci",
    "--windows-standalone-build", "--disable-metadata", "--disable-all-custom-nodes",
    "--whitelist-custom-nodes", "--disable-api-nodes", "--multi-user", "--verbose",
    "--log-stdout", "--front-end-version", "--front-end-root", "--user-directory",
    "--enable-compress-response-body", "--comfy-api-base", "--database-url",
    "--disable-assets-autoscan")


def serve_args(*argv: str) -> argparse.Namespace:
    args = build_parser()[0].parse_args(list(argv))
    settle_flags(args)
    return args


def test_the_server_accepts_every_comfyui_flag() -> None:
    assert set(COMFYUI_FLAGS) - flag_names(build_parser()[0]) == set()


def test_a_typical_launch_script_parses() -> None:
    args = serve_args("--listen", "--port", "8190", "--preview-method", "auto",
                      "--use-pytorch-cross-attention", "--fast", "fp16_accumulation",
                      "--async-offload", "2", "--extra-model-paths-config", "a.yaml", "b.yaml",
                      "--disable-auto-launch", "--verbose", "WARNING")
    assert args.port == 8190 and args.log_level == "WARNING" and not args.verbose
    assert [str(path) for path in args.extra_model_paths_config] == ["a.yaml", "b.yaml"]


def test_verbose_without_a_level_means_debug_with_tracebacks() -> None:
    args = serve_args("--verbose")
    assert args.log_level == "DEBUG" and args.verbose
    assert serve_args().log_level == "INFO"


def test_each_inert_flag_given_is_reported_in_one_line_naming_it() -> None:
    lines = inert_flags_given(serve_args("--use-sage-attention", "--fast", "--directml"))
    assert len(lines) == 3
    assert lines[0].startswith("--directml has no effect in Loom: ")
    assert any(line.startswith("--fast has no effect in Loom: ") for line in lines)


def test_no_inert_flag_is_reported_when_none_is_given() -> None:
    assert inert_flags_given(serve_args("--cpu")) == []


def test_inert_flags_are_not_also_working_flags() -> None:
    working = flag_names(build_parser()[1]) - {inert.flag for inert in INERT_FLAGS}
    assert {inert.flag for inert in INERT_FLAGS}.isdisjoint(working)


@pytest.mark.parametrize("pair", [("--fp16-vae", "--bf16-vae"), ("--fp16-unet", "--bf16-unet"),
                                  ("--fp16-text-enc", "--fp32-text-enc"),
                                  ("--force-fp32", "--force-fp16")])
def test_exclusive_precision_flags_are_refused_together_as_in_comfyui(
        pair: tuple[str, str]) -> None:
    with pytest.raises(SystemExit):
        build_parser()[0].parse_args(list(pair))


def test_tls_files_come_in_pairs() -> None:
    with pytest.raises(ValueError, match="--tls-certfile"):
        serve_args("--tls-keyfile", "key.pem")


def policy(*argv: str) -> DevicePolicy:
    return DevicePolicy.from_args(serve_args("--cpu", *argv))


def test_force_fp32_with_fp16_text_enc_is_comfyuis_cpu_text_encoder() -> None:
    chosen = policy("--force-fp32", "--fp16-text-enc")
    assert chosen.unet_dtype == chosen.vae_dtype == torch.float32
    assert (chosen.text_dtype, chosen.text_storage_dtype) == (torch.float32, torch.float16)


def test_text_encoder_storage_flags_compute_in_fp32() -> None:
    for flag, storage in (("--bf16-text-enc", torch.bfloat16),
                          ("--fp8_e4m3fn-text-enc", torch.float8_e4m3fn),
                          ("--fp8_e5m2-text-enc", torch.float8_e5m2)):
        chosen = policy(flag)
        assert (chosen.text_dtype, chosen.text_storage_dtype) == (torch.float32, storage)


def test_unet_precision_flags_override_force_fp32_as_in_comfyui() -> None:
    assert policy("--force-fp32", "--bf16-unet").unet_holding.storage == torch.bfloat16
    assert policy("--fp64-unet").unet_dtype == torch.float64
    assert policy("--force-fp16").unet_dtype == torch.float16


def test_fp8_unet_flags_store_the_weights_in_fp8_and_keep_the_compute_dtype() -> None:
    chosen = policy("--force-fp32", "--fp8_e4m3fn-unet")
    assert (chosen.unet_dtype, chosen.unet_storage_dtype) == (torch.float32,
                                                              torch.float8_e4m3fn)


def test_cpu_vae_runs_the_vae_on_the_cpu_in_fp32_unless_told_otherwise() -> None:
    chosen = DevicePolicy.decide(cuda_available=True, cpu_vae=True)
    assert chosen.vae_compute_device == torch.device("cpu")
    assert chosen.vae_dtype == torch.float32
    assert DevicePolicy.decide(cuda_available=True, cpu_vae=True,
                               bf16_vae=True).vae_dtype == torch.bfloat16


def test_unknown_precision_flags_are_an_error_naming_them() -> None:
    with pytest.raises(TypeError, match="fp4_unet"):
        DevicePolicy.decide(fp4_unet=True)


def test_inert_flag_lines_go_to_the_log(caplog: pytest.LogCaptureFixture) -> None:
    from engine.launch_flags import report_inert_flags

    with caplog.at_level(logging.WARNING, logger="loom"):
        report_inert_flags(serve_args("--disable-xformers"))
    assert "--disable-xformers has no effect in Loom: Loom does not use xformers" in caplog.text
