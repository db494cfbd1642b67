"""nn.Conv2d whose bf16 CPU path keeps its weight pre-packed in oneDNN's blocked layout.

oneDNN reorders a plain conv weight into its blocked layout on every call. On the UNet's lowest
level (1280-2560 channels, 3x3, 8x8 maps) the weight is larger than the activations and the
reorder costs more than the convolution: packed once, those convs run 1.5-3x faster on an
AVX512-BF16 CPU, for a second copy of those weights (~0.5 GB for SD1.5 in bf16). The packed
copy is derived state: it is rebuilt whenever the weight changes
(a LoRA patch, an unpatch, an eviction and reload) and dropped with `drop_packed()`."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from engine.diffusion.memory.cast_on_use import casts_on_use

# Inputs with at most this many pixels per map get a packed weight: the UNets' lowest level
# (8x8 for SD1 at 512, 12x12 for SD2 at 768), where 1280-2560-channel weights dwarf the
# activations and packing makes the convs 1.5-3x faster. At 16x16 the gain is ~10% and not
# worth a second copy of 233M parameters; larger maps gain nothing.
PACK_MAX_PIXELS = 12 * 12


@functools.cache
def bf16_packing_supported() -> bool:
    """oneDNN packs bf16 conv weights only on CPUs with AVX512-BW/VL/DQ or AVX-NE-CONVERT."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def packable(x: Tensor, weight: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.dtype == x.dtype
            and x.dim() == 4 and x.shape[-2] * x.shape[-1] <= PACK_MAX_PIXELS
            and not (weight.requires_grad and torch.is_grad_enabled())
            and bf16_packing_supported())


class Conv2d(nn.Conv2d):
    """Drop-in nn.Conv2d (same parameters, same state_dict keys)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._packed: tuple[tuple[object, ...], Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        # a held layer's weight is a fresh cast copy each call: packing it would repack per call
        if self.padding_mode != "zeros" or casts_on_use(self) or not packable(x, self.weight):
            return super().forward(x)
        x = x.contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed_weight(x), self.bias, list(self.padding), list(self.stride),
            list(self.dilation), self.groups, "none", [], "")

    def _packed_weight(self, x: Tensor) -> Tensor:
        weight = self.weight
        # the storage and its in-place version identify the weight's current values
        key = (id(weight), weight.data_ptr(), weight._version, tuple(x.shape[1:]))
        if self._packed is None or self._packed[0] != key:
            self._packed = None  # release the stale copy before building the new one
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.detach().to_mkldnn(), list(self.padding), list(self.stride),
                list(self.dilation), self.groups, list(x.shape))
            self._packed = (key, packed)
        return self._packed[1]

    def derived_bytes(self) -> int:
        """Bytes of the packed copy held (the model manager counts them in its RAM budget)."""
        if self._packed is None:
            return 0
        packed = self._packed[1]
        return packed.numel() * packed.element_size()

    def drop_packed(self) -> None:
        """Forget the packed copy (the model manager calls this when it evicts the weights)."""
        self._packed = None

