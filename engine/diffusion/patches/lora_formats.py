"""The LoRA family's file formats: which tensors of a file belong to which adapted module, and
each format's weight delta (float32).

Format facts (per adapted module; `scale` = alpha / rank, alpha = rank when absent):

* LoRA / LoCon (kohya `lora_up`/`lora_down`, PEFT `lora_B`/`lora_A`, diffusers `lora.up`/
  `lora.down`): delta = scale * up @ down, trailing kernel dims flattened; a 3x3 LoCon has down
  [r, in, 3, 3] and up [out, r, 1, 1]; with a Tucker `lora_mid` [r, r, kh, kw] (down and up
  1x1) delta[o, i] = sum_ab up[o, a] mid[a, b] down[b, i]. rank = down.shape[0].
* LoHa (LyCORIS): delta = scale * (w1_a @ w1_b) * (w2_a @ w2_b) (Hadamard product); with
  Tucker cores t1/t2, w = einsum("ijhw,jr,ip->prhw", t, w_b, w_a). rank = w1_b.shape[0].
* LoKr (LyCORIS): delta = scale * kron(w1, w2), each factor full (`lokr_w1`) or a product
  (`lokr_w1_a @ lokr_w1_b`; w2 also as a Tucker product with `lokr_t2`); scale = alpha / rank
  only when a factor is decomposed (rank = w2_b's, else w1_b's), else 1.
* Full difference: `diff` (weight) and `diff_b` (bias; ComfyUI's extracted LoRAs add it to
  any format), LyCORIS norms `w_norm`/`b_norm`.
* DoRA (`dora_scale`, PEFT `lora_magnitude_vector`): W' = m * (W + delta) / ||W + delta||, the
  norm per output row when m has one entry per output, else per input column (Liu et al. 2024,
  "DoRA: Weight-Decomposed Low-Rank Adaptation"); the patch adds strength * (W' - W).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor

# key suffix -> role, longest first where one suffix ends another
SUFFIX_ROLES = MappingProxyType({
    ".lora_linear_layer.up.weight": "up", ".lora_linear_layer.down.weight": "down",
    ".lora_up.weight": "up", ".lora_down.weight": "down", ".lora_mid.weight": "mid",
    ".lora_B.weight": "up", ".lora_A.weight": "down",
    ".lora.up.weight": "up", ".lora.down.weight": "down",
    ".alpha": "alpha", ".dora_scale": "dora_scale",
    ".lora_magnitude_vector.weight": "dora_scale", ".lora_magnitude_vector": "dora_scale",
    ".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a",
    ".hada_w2_b": "hada_w2_b", ".hada_t1": "hada_t1", ".hada_t2": "hada_t2",
    ".lokr_w1": "lokr_w1", ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2", ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b",
    ".lokr_t2": "lokr_t2", ".diff": "diff", ".diff_b": "diff_b", ".w_norm": "diff",
    ".b_norm": "diff_b",
})
_SUFFIXES = tuple(sorted(SUFFIX_ROLES, key=len, reverse=True))
# old diffusers attention-processor LoRAs: `<attn>.processor.to_q_lora.down.weight`
_PROCESSOR = re.compile(r"^(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora"
                        r"\.(?P<role>up|down)\.weight$")


def split_key(key: str) -> tuple[str, str] | None:
    """(module name, role) of one file key, or None when the key is no adapter tensor."""
    processor = _PROCESSOR.match(key)
    if processor:
        projection = "to_out.0" if processor["proj"] == "to_out" else processor["proj"]
        return f"{processor['attn']}.{projection}", processor["role"]
    for suffix in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], SUFFIX_ROLES[suffix]
    return None


class LoraFormatError(ValueError):
    """Tensors of one adapted module that do not form any known adapter."""


def _f32(tensor: Tensor, device: torch.device) -> Tensor:
    return tensor.to(device=device, dtype=torch.float32)


def _scale(alpha: Tensor | None, rank: int | None) -> float:
    return 1.0 if alpha is None or not rank else float(alpha) / rank


def tucker(core: Tensor, factor_b: Tensor, factor_a: Tensor) -> Tensor:
    """LyCORIS Tucker rebuild: core [r, r, kh, kw], b [r, in], a [r, out] -> [out, in, kh, kw]."""
    return torch.einsum("ijhw,jr,ip->prhw", core, factor_b, factor_a)


@dataclass(frozen=True)
class Adapter:
    """One adapted module of a file: its format, tensors by role, and the file keys used."""

    kind: str  # "lora", "loha", "lokr" or "diff"
    tensors: Mapping[str, Tensor]
    alpha: Tensor | None  # read when a delta is computed (parsing touches no tensor data)
    keys: tuple[str, ...]

    def weight_shape(self) -> tuple[int, ...] | None:
        """Shape of the weight delta (numel must equal the target's); None: no weight part."""
        return WEIGHT_SHAPES[self.kind](self.tensors)

    def bias_delta(self, device: torch.device) -> Tensor | None:
        bias = self.tensors.get("diff_b")
        return None if bias is None else _f32(bias, device)

    def weight_delta(self, weight: Tensor) -> Tensor:
        """float32 delta for the current float32 `weight` (read by DoRA only, never changed)."""
        delta = WEIGHT_DELTAS[self.kind](self.tensors, self.alpha, weight.device)
        delta = delta.reshape(weight.shape)
        magnitude = self.tensors.get("dora_scale")
        if magnitude is None:
            return delta
        return dora_delta(weight, delta, _f32(magnitude, weight.device))


def dora_delta(weight: Tensor, delta: Tensor, magnitude: Tensor) -> Tensor:
    """m * V / ||V|| - W for V = W + delta (norm per output row or per input column)."""
    merged = weight + delta
    outputs = weight.shape[0]
    if magnitude.numel() == outputs and (magnitude.ndim == 1 or magnitude.shape[0] == outputs):
        norm = merged.reshape(outputs, -1).norm(dim=1).reshape(outputs, *[1] * (weight.ndim - 1))
    else:
        inputs = weight.shape[1]
        norm = merged.transpose(0, 1).reshape(inputs, -1).norm(dim=1)
        norm = norm.reshape(1, inputs, *[1] * (weight.ndim - 2))
    norm = norm + torch.finfo(torch.float32).eps
    return merged * (magnitude.reshape(norm.shape) / norm) - weight


def _lora_shape(t: Mapping[str, Tensor]) -> tuple[int, ...]:
    kernel = t["mid"].shape[2:] if "mid" in t else t["down"].shape[2:]
    return (t["up"].shape[0], t["down"].shape[1], *kernel)


def _lora_delta(t: Mapping[str, Tensor], alpha: Tensor | None, device: torch.device) -> Tensor:
    up, down = _f32(t["up"], device).flatten(1), _f32(t["down"], device).flatten(1)
    scale = _scale(alpha, t["down"].shape[0])
    if "mid" in t:
        mid = _f32(t["mid"], device)
        return torch.einsum("abhw,oa,bi->oihw", mid, up, down) * scale
    return (up @ down) * scale  # (out, in * kh * kw)


def _hada_factor(t: Mapping[str, Tensor], which: str, device: torch.device) -> Tensor:
    factor_a, factor_b = _f32(t[f"hada_w{which}_a"], device), _f32(t[f"hada_w{which}_b"], device)
    core = t.get(f"hada_t{which}")
    if core is not None:
        return tucker(_f32(core, device), factor_b, factor_a)
    return factor_a @ factor_b.flatten(1)


def _loha_shape(t: Mapping[str, Tensor]) -> tuple[int, ...]:
    if "hada_t1" in t:
        return (t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1], *t["hada_t1"].shape[2:])
    return (t["hada_w1_a"].shape[0], math.prod(t["hada_w1_b"].shape[1:]))


def _loha_delta(t: Mapping[str, Tensor], alpha: Tensor | None, device: torch.device) -> Tensor:
    scale = _scale(alpha, t["hada_w1_b"].shape[0])
    return _hada_factor(t, "1", device) * _hada_factor(t, "2", device) * scale


def _lokr_factor_shape(t: Mapping[str, Tensor], which: str) -> tuple[int, ...]:
    if f"lokr_w{which}" in t:
        return tuple(t[f"lokr_w{which}"].shape)
    if f"lokr_t{which}" in t:
        return (t[f"lokr_w{which}_a"].shape[1], t[f"lokr_w{which}_b"].shape[1],
                *t[f"lokr_t{which}"].shape[2:])
    return (t[f"lokr_w{which}_a"].shape[0], *t[f"lokr_w{which}_b"].shape[1:])


def _lokr_shape(t: Mapping[str, Tensor]) -> tuple[int, ...]:
    first, second = _lokr_factor_shape(t, "1"), _lokr_factor_shape(t, "2")
    return (first[0] * second[0], first[1] * second[1], *second[2:])


def _lokr_factor(t: Mapping[str, Tensor], which: str, device: torch.device) -> Tensor:
    full = t.get(f"lokr_w{which}")
    if full is not None:
        return _f32(full, device)
    factor_a, factor_b = _f32(t[f"lokr_w{which}_a"], device), _f32(t[f"lokr_w{which}_b"], device)
    core = t.get(f"lokr_t{which}")
    if core is not None:
        return tucker(_f32(core, device), factor_b, factor_a)
    return (factor_a @ factor_b.flatten(1)).reshape(factor_a.shape[0], *factor_b.shape[1:])


def _lokr_delta(t: Mapping[str, Tensor], alpha: Tensor | None, device: torch.device) -> Tensor:
    rank = next((t[key].shape[0] for key in ("lokr_w2_b", "lokr_w1_b") if key in t), None)
    first, second = _lokr_factor(t, "1", device), _lokr_factor(t, "2", device)
    while first.ndim < second.ndim:
        first = first.unsqueeze(-1)  # (a, b) -> (a, b, 1, 1) beside a conv factor
    return torch.kron(first.contiguous(), second.contiguous()) * _scale(alpha, rank)


def _diff_shape(t: Mapping[str, Tensor]) -> tuple[int, ...] | None:
    return tuple(t["diff"].shape) if "diff" in t else None


def _diff_delta(t: Mapping[str, Tensor], alpha: Tensor | None, device: torch.device) -> Tensor:
    return _f32(t["diff"], device)


WEIGHT_SHAPES = MappingProxyType({"lora": _lora_shape, "loha": _loha_shape,
                                  "lokr": _lokr_shape, "diff": _diff_shape})
WEIGHT_DELTAS = MappingProxyType({"lora": _lora_delta, "loha": _loha_delta,
                                  "lokr": _lokr_delta, "diff": _diff_delta})
# roles each format needs, may have, and the roles that mark it
_NEEDS = MappingProxyType({
    "lora": frozenset({"up", "down"}),
    "loha": frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    "lokr": frozenset(), "diff": frozenset()})
# (a bias difference `diff_b` may come with any weight format: ComfyUI's extracted LoRAs)
_ALLOWS = MappingProxyType({
    "lora": frozenset({"up", "down", "mid", "alpha", "dora_scale", "diff_b"}),
    "loha": frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                       "alpha", "dora_scale", "diff_b"}),
    "lokr": frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                       "lokr_t2", "alpha", "dora_scale", "diff_b"}),
    "diff": frozenset({"diff", "diff_b"})})


def _kind_of(roles: frozenset[str]) -> str:
    if roles & {"up", "down", "mid"}:
        return "lora"
    if any(role.startswith("hada_") for role in roles):
        return "loha"
    if any(role.startswith("lokr_") for role in roles):
        return "lokr"
    if roles & {"diff", "diff_b"}:
        return "diff"
    raise LoraFormatError(f"only {sorted(roles)} tensors: no adapter weights")


def _check_lokr(roles: frozenset[str]) -> None:
    for which in "12":
        full = f"lokr_w{which}" in roles
        parts = {f"lokr_w{which}_a", f"lokr_w{which}_b"} <= roles
        if full == parts:
            raise LoraFormatError(f"LoKr factor w{which} needs either lokr_w{which} or both "
                                  f"lokr_w{which}_a and lokr_w{which}_b; found {sorted(roles)}")


def make_adapter(tensors: Mapping[str, Tensor], keys: tuple[str, ...]) -> Adapter:
    """The adapter formed by one module's tensors (by role); LoraFormatError when none is."""
    roles = frozenset(tensors)
    kind = _kind_of(roles)
    missing, extra = _NEEDS[kind] - roles, roles - _ALLOWS[kind]
    if missing or extra:
        raise LoraFormatError(f"{kind} tensors incomplete or mixed: missing {sorted(missing)}, "
                              f"unexpected {sorted(extra)}")
    if kind == "lokr":
        _check_lokr(roles)
    weights = {role: tensor for role, tensor in tensors.items() if role != "alpha"}
    return Adapter(kind, MappingProxyType(weights), tensors.get("alpha"), keys)

