"""Conv2d's pre-packed bf16 CPU path: the same numbers as the plain convolution, rebuilt when
the weight changes in place (LoRA patch and unpatch), and only where it pays."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.diffusion.memory.packed_conv import (
    PACK_MAX_PIXELS,
    Conv2d,
    bf16_packing_supported,
    packable,
)

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="needs PyTorch built with oneDNN")


def layer(channels: int = 64, **kwargs: object) -> Conv2d:
    torch.manual_seed(0)
    conv = Conv2d(channels, channels, kernel_size=3, padding=1, **kwargs).eval()
    return conv.to(dtype=torch.bfloat16, memory_format=torch.channels_last)


def feature_map(size: int, channels: int = 64) -> torch.Tensor:
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    return x.bfloat16().contiguous(memory_format=torch.channels_last)


def plain(conv: Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)


needs_bf16_packing = pytest.mark.skipif(
    not bf16_packing_supported(), reason="oneDNN cannot pack bf16 conv weights on this CPU")


@needs_bf16_packing
def test_small_maps_take_the_packed_path_with_the_same_result() -> None:
    conv, x = layer(), feature_map(8)
    with torch.inference_mode():
        out = conv(x)
    assert conv._packed is not None
    torch.testing.assert_close(out, plain(conv, x), atol=1e-2, rtol=1e-2)


def test_large_maps_and_fp32_keep_the_plain_path() -> None:
    conv = layer()
    big = feature_map(int(PACK_MAX_PIXELS**0.5) * 2)
    assert not packable(big, conv.weight)
    assert not packable(feature_map(8).float(), conv.weight.float())


@needs_bf16_packing
def test_the_packed_copy_reports_its_bytes_until_dropped() -> None:
    conv, x = layer(), feature_map(8)
    assert conv.derived_bytes() == 0
    with torch.inference_mode():
        conv(x)
    assert conv.derived_bytes() >= conv.weight.numel() * conv.weight.element_size()
    conv.drop_packed()
    assert conv.derived_bytes() == 0


@needs_bf16_packing
def test_an_in_place_weight_change_repacks() -> None:
    conv, x = layer(), feature_map(8)
    with torch.inference_mode():
        before = conv(x)
        original = conv.weight.detach().clone()
        conv.weight.add_(0.5)  # as a LoRA patch does
        patched = conv(x)
        torch.testing.assert_close(patched, plain(conv, x), atol=1e-2, rtol=1e-2)
        conv.weight.copy_(original)  # unpatch
        assert torch.equal(conv(x), before)


def test_strided_conv_and_drop_packed() -> None:
    conv, x = layer(stride=2), feature_map(16)
    with torch.inference_mode():
        out = conv(x)
        torch.testing.assert_close(out, plain(conv, x), atol=1e-2, rtol=1e-2)
    conv.drop_packed()
    assert conv._packed is None


def test_a_cpu_that_cannot_pack_bf16_keeps_the_plain_path(monkeypatch) -> None:
    bf16_packing_supported.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    conv, x = layer(), feature_map(8)
    try:
        assert not packable(x, conv.weight)
        with torch.inference_mode():
            torch.testing.assert_close(conv(x), plain(conv, x), atol=1e-2, rtol=1e-2)
        assert conv._packed is None
    finally:
        bf16_packing_supported.cache_clear()


def test_state_dict_keys_are_those_of_nn_conv2d() -> None:
    assert layer().state_dict().keys() == torch.nn.Conv2d(64, 64, 3).state_dict().keys()
