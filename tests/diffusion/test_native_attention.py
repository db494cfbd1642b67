"""The AVX512-BF16 flash-attention kernel: same results as PyTorch's attention within bf16
rounding, on the shapes the UNets use and on awkward ones; its build and its fallbacks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.diffusion.kernels import native_attention
from engine.diffusion.networks.attention import CrossAttention

needs_kernel = pytest.mark.skipif(native_attention.kernel() is None,
                                  reason="needs an x86 CPU with AVX512-BF16 and a C compiler")


def bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[float, float]:
    """(kernel's, PyTorch bf16 SDPA's) max abs error against SDPA in fp32."""
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    ours = native_attention.attention(q, k, v).float()
    torch_bf16 = F.scaled_dot_product_attention(q, k, v).float()
    return (ours - reference).abs().max().item(), (torch_bf16 - reference).abs().max().item()


@needs_kernel
@pytest.mark.parametrize(("tq", "tk", "dim"), [
    (4096 // 16, 4096 // 16, 40),  # SD1 self-attention, 64x64 map (scaled down)
    (256, 77, 40),  # SD1 cross-attention on the 77 text tokens
    (1024 // 4, 1024 // 4, 80),
    (64, 77, 160),
    (100, 300, 64),  # SD2 / SDXL heads; neither length a multiple of the kernel's blocks
    (1, 1, 8),
    (3, 7, 7),  # odd head width: the last dim pair is half padding
    (33, 250, 256),  # the widest head the kernel takes
])
def test_matches_pytorch_attention_within_bf16_rounding(tq: int, tk: int, dim: int) -> None:
    q, k, v = bf16(2, 3, tq, dim, seed=1), bf16(2, 3, tk, dim, seed=2), bf16(2, 3, tk, dim, seed=3)
    ours, torch_bf16 = errors(q, k, v)
    assert ours <= 2 * torch_bf16 + 2e-3


@needs_kernel
def test_takes_heads_split_from_token_major_projections() -> None:
    """q/k/v as CrossAttention makes them: (B, T, heads*dim) viewed as (B, heads, T, dim)."""
    tokens = bf16(2, 130, 8 * 40, seed=4)
    split = tokens.view(2, 130, 8, 40).transpose(1, 2)
    assert not split.is_contiguous() and native_attention.supports(split, split, split)
    ours, torch_bf16 = errors(split, split, split)
    assert ours <= 2 * torch_bf16 + 2e-3


@needs_kernel
def test_output_merges_heads_without_a_copy() -> None:
    q = bf16(1, 4, 70, 40, seed=5)
    out = native_attention.attention(q, q, q)
    assert out.shape == (1, 4, 70, 40)
    assert out.transpose(1, 2).is_contiguous()


@needs_kernel
def test_cross_attention_layer_agrees_with_its_fp32_self() -> None:
    torch.manual_seed(0)
    layer = CrossAttention(query_dim=320, context_dim=768, heads=8, dim_head=40).eval()
    x, context = torch.randn(2, 200, 320), torch.randn(2, 77, 768)
    with torch.inference_mode():
        reference = layer(x, context)
        ours = layer.bfloat16()(x.bfloat16(), context.bfloat16()).float()
    assert (ours - reference).abs().max().item() < 0.05 * reference.abs().max().item()


def test_other_dtypes_and_shapes_go_to_pytorch() -> None:
    q = torch.randn(1, 2, 16, 40)
    assert not native_attention.supports(q, q, q)  # fp32
    wide = torch.randn(1, 1, 4, 320).bfloat16()
    assert not native_attention.supports(wide, wide, wide)  # head wider than 256
    assert not native_attention.supports(q.bfloat16(), q[:, :1].bfloat16(), q[:, :1].bfloat16())


def test_build_is_reused_by_source_hash(tmp_path: Path) -> None:
    if not native_attention.cpu_has_native_bf16():
        pytest.skip("the kernel is only built on CPUs with AVX512-BF16")
    try:
        first = native_attention.build(directory=tmp_path)
    except native_attention.KernelBuildError as error:
        pytest.skip(f"no working C compiler: {error}")
    mtime = first.stat().st_mtime_ns
    assert native_attention.build(directory=tmp_path) == first
    assert first.stat().st_mtime_ns == mtime


def test_a_failed_build_says_what_the_compiler_said(tmp_path: Path) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("int f( {\n")
    with pytest.raises(native_attention.KernelBuildError, match="broken.c"):
        native_attention.build(broken, directory=tmp_path / "out")
