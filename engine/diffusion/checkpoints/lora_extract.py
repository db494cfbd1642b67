"""LoRA extraction from a model difference (ComfyUI's "Extract and Save Lora"): the weights of
a MODEL / CLIP that holds a difference (ModelMergeSubtract, CLIPMergeSubtract) become a LoRA
file in ComfyUI's key format, which Loom's and ComfyUI's LoRA loaders read back.

Per weight W (patches applied), by ComfyUI's rules:

* "standard": a matrix or conv kernel (ndim >= 2) becomes a rank-r factorisation by truncated
  SVD of W flattened to (out, in * kh * kw): up = U_r diag(S_r), down = Vh_r, with
  r = min(rank, out, in); both are clamped to +-q, q the 0.99 quantile of all their entries
  (outliers would waste fp16 range); conv kernels give up (out, r, 1, 1) and down
  (r, in, kh, kw). Vectors (norm weights) are stored whole as `.diff` when `bias_diff`.
* "full_diff": every weight stored whole as `.diff`.
* With `bias_diff`, every bias is stored whole as `.diff_b`.

Keys: `diffusion_model.<LDM module path>.lora_up.weight` / `.lora_down.weight` / `.diff` /
`.diff_b` for the UNet; `text_encoders.clip_<l|h|g>.transformer.<HF CLIPTextModel path>...`
for text encoders (OpenCLIP towers are written in HF naming: q/k/v split, text_projection
transposed). No alpha is written (scale 1). Tensors are fp16, as ComfyUI writes them."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from enum import Enum

import torch
from torch import Tensor

from engine.diffusion.checkpoints.text_encoders import hf_text_encoder_state
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.patches.patching import patched
from engine.diffusion.text.encoding import TextEncoderStack

logger = logging.getLogger("loom.lora")
CLAMP_QUANTILE = 0.99
UNET_PREFIX = "diffusion_model."
TEXT_PREFIX = "text_encoders."
SAVED_DTYPE = torch.float16


class LoraType(str, Enum):
    STANDARD = "standard"
    FULL_DIFF = "full_diff"


def quantile(values: Tensor, q: float) -> Tensor:
    """torch.quantile's default (linear interpolation between the two nearest ranks), without
    its 16M-element limit."""
    ordered = values.flatten().sort().values
    position = (ordered.numel() - 1) * q
    low = int(position)
    high = min(low + 1, ordered.numel() - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def extract_lora(diff: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(up, down) of rank min(rank, out, in) approximating `diff` (module docstring)."""
    out_dim, in_dim = diff.shape[:2]
    rank = min(rank, in_dim, out_dim)
    left, values, right = torch.linalg.svd(diff.float().flatten(1), full_matrices=False)
    up = left[:, :rank] * values[:rank]  # U_r diag(S_r): (out, r)
    down = right[:rank]  # (r, in * kh * kw)
    limit = quantile(torch.cat([up.flatten(), down.flatten()]), CLAMP_QUANTILE)
    up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    if diff.ndim == 4:
        return up.reshape(out_dim, rank, 1, 1), down.reshape(rank, in_dim, *diff.shape[2:])
    return up, down


def _saved(tensor: Tensor) -> Tensor:
    return tensor.detach().to("cpu", SAVED_DTYPE).contiguous()


def lora_tensors(weights: Iterator[tuple[str, Tensor]], rank: int, lora_type: LoraType,
                 bias_diff: bool) -> dict[str, Tensor]:
    """The LoRA file's tensors for `(module.weight | module.bias, difference)` pairs, the
    names already carrying the file's prefix."""
    out: dict[str, Tensor] = {}
    for name, value in weights:
        if name.endswith(".bias"):
            if bias_diff:
                out[name.removesuffix(".bias") + ".diff_b"] = _saved(value)
            continue
        module = name.removesuffix(".weight")
        if lora_type is LoraType.FULL_DIFF or value.ndim < 2:
            if lora_type is LoraType.FULL_DIFF or bias_diff:
                out[module + ".diff"] = _saved(value)
            continue
        try:
            up, down = extract_lora(value, rank)
        except torch.linalg.LinAlgError as exc:
            logger.warning("could not extract a LoRA for %s (%s); is its difference all NaN or "
                           "infinite? It is left out", name, exc)
            continue
        out[module + ".lora_up.weight"] = _saved(up)
        out[module + ".lora_down.weight"] = _saved(down)
    return out


def _weights_and_biases(state: Mapping[str, Tensor], prefix: str
                        ) -> Iterator[tuple[str, Tensor]]:
    for name, value in state.items():
        if name.endswith((".weight", ".bias")) and value.is_floating_point():
            yield prefix + name, value


def model_lora(model: ModelHandle, rank: int, lora_type: LoraType, bias_diff: bool
               ) -> dict[str, Tensor]:
    """The UNet part of the file, from the model's weights with its patches applied."""
    with torch.no_grad(), patched(model.unet, model.patches) as unet:
        return lora_tensors(_weights_and_biases(unet.state_dict(), UNET_PREFIX), rank,
                            lora_type, bias_diff)


def text_lora(clip: TextEncoderStack, rank: int, lora_type: LoraType, bias_diff: bool
              ) -> dict[str, Tensor]:
    """The text-encoder part of the file, each encoder under its patches, in HF naming."""
    out: dict[str, Tensor] = {}
    for name, encoder in clip.encoders.items():
        with torch.no_grad(), patched(encoder, clip.patches.get(name, ())):
            state = hf_text_encoder_state(encoder)
            prefix = f"{TEXT_PREFIX}clip_{name}.transformer."
            out.update(lora_tensors(_weights_and_biases(state, prefix), rank, lora_type,
                                    bias_diff))
    return out
