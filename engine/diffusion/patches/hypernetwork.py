"""A1111 hypernetworks: small MLPs that rewrite cross-attention's text context, one pair
(for the keys and for the values) per context width.

File format (A1111 `.pt`, a pickled dict): integer keys (context widths, e.g. 768) each hold
[key_module_state, value_module_state], where a module state has `linear.{i}.weight/bias` for
the layers of an nn.Sequential (Linear, then activation, then LayerNorm when `is_layer_norm`,
then Dropout: only Linear and LayerNorm carry tensors); plus `layer_structure` (e.g. [1, 2, 1]),
`activation_func`, `is_layer_norm`, `use_dropout`, `activate_output` and bookkeeping fields.
A `.safetensors` file (Loom's convention) holds `<width>.<0|1>.linear.<i>.<weight|bias>`
tensors and the settings as JSON metadata values. Reading either file is
checkpoints/addon_files.py's job (`.pt` only with --allow-pickle-checkpoints, as every pickle).

Application (as ComfyUI applies them, cross-attention only): key context = c + mlp_k(c) *
strength, value context = c + mlp_v(c) * strength; the activation follows every Linear but the
last (the last too when `activate_output`), and LayerNorm follows the activation."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.diffusion.memory.offload import compute_device
from engine.diffusion.networks.attention import BasicTransformerBlock, CrossAttention
from engine.diffusion.patches.patching import Undo

ACTIVATIONS: Mapping[str, Callable[[Tensor], Tensor]] = MappingProxyType({
    "linear": lambda x: x, "relu": F.relu, "leakyrelu": F.leaky_relu, "elu": F.elu,
    "swish": F.hardswish,  # A1111's "swish" is torch.nn.Hardswish
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "softsign": F.softsign, "mish": F.mish,
    "gelu": F.gelu})
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which A1111 uses


class HypernetworkError(ValueError):
    """A hypernetwork file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class HyperLayer:
    """Linear [out, in] (+ bias), then the activation if `activate`, then an optional LayerNorm."""

    weight: Tensor
    bias: Tensor | None
    activate: bool
    norm_weight: Tensor | None = None
    norm_bias: Tensor | None = None

    def to(self, device: torch.device) -> HyperLayer:
        """float32 copies on `device` (the file's tensors stay where they are)."""
        return HyperLayer(self.weight.to(device, torch.float32), _moved(self.bias, device),
                          self.activate, _moved(self.norm_weight, device),
                          _moved(self.norm_bias, device))


def _moved(tensor: Tensor | None, device: torch.device) -> Tensor | None:
    return None if tensor is None else tensor.to(device, torch.float32)


@dataclass(frozen=True)
class HyperModule:
    """One MLP (for the keys or for the values): its layers and activation name."""

    layers: tuple[HyperLayer, ...]
    activation: str

    def __call__(self, x: Tensor) -> Tensor:
        """The MLP's output (without the residual) in float32."""
        act = ACTIVATIONS[self.activation]
        h = x.float()
        for layer in self.layers:
            h = F.linear(h, layer.weight, layer.bias)
            if layer.activate:
                h = act(h)
            if layer.norm_weight is not None:
                h = F.layer_norm(h, (h.shape[-1],), layer.norm_weight, layer.norm_bias,
                                 LAYER_NORM_EPS)
        return h

    def to(self, device: torch.device) -> HyperModule:
        return HyperModule(tuple(layer.to(device) for layer in self.layers), self.activation)


@dataclass(frozen=True)
class Hypernetwork:
    """The (key MLP, value MLP) pair for each context width."""

    name: str
    modules: Mapping[int, tuple[HyperModule, HyperModule]]


@dataclass(frozen=True)
class ContextHook:
    """CrossAttention.context_hook: c + mlp(c) * strength for keys and values, after `inner`
    (an earlier hypernetwork's hook, so several stack in order)."""

    key_module: HyperModule
    value_module: HyperModule
    strength: float
    inner: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    def __call__(self, key_context: Tensor, value_context: Tensor) -> tuple[Tensor, Tensor]:
        if self.inner is not None:
            key_context, value_context = self.inner(key_context, value_context)
        key_delta = self.key_module(key_context) * self.strength
        value_delta = self.value_module(value_context) * self.strength
        return (key_context + key_delta.to(key_context.dtype),
                value_context + value_delta.to(value_context.dtype))


@dataclass(frozen=True, eq=False)
class HypernetworkPatch:
    """A Patch that hooks every cross-attention whose context width the file covers."""

    hypernetwork: Hypernetwork
    strength: float

    def apply(self, module: nn.Module) -> Undo:
        hooked: list[tuple[CrossAttention, Any]] = []
        moved: dict[tuple[int, torch.device], tuple[HyperModule, HyperModule]] = {}
        device = compute_device(module)  # a streamed to_k's weight rests elsewhere
        for block in module.modules():
            if not isinstance(block, BasicTransformerBlock):
                continue
            attention = block.attn2
            width = attention.to_k.in_features
            if width not in self.hypernetwork.modules:
                continue
            if (width, device) not in moved:
                key_module, value_module = self.hypernetwork.modules[width]
                moved[(width, device)] = (key_module.to(device), value_module.to(device))
            previous = attention.context_hook
            attention.context_hook = ContextHook(*moved[(width, device)], self.strength, previous)
            hooked.append((attention, previous))

        def undo() -> None:
            for attention, previous in reversed(hooked):
                attention.context_hook = previous

        return undo


def _layers(state: Mapping[str, Tensor], activation: str, activate_output: bool,
            where: str) -> tuple[HyperLayer, ...]:
    """Layers from a module state: 2-D weights are Linears, 1-D ones their LayerNorms."""
    indices = sorted({int(key.split(".")[1]) for key in state
                      if key.startswith("linear.") and key.endswith(".weight")})
    if not indices:
        raise HypernetworkError(f"{where}: no linear.<i>.weight tensors")
    linears: list[tuple[Tensor, Tensor | None]] = []
    norms: dict[int, tuple[Tensor, Tensor | None]] = {}
    for index in indices:
        weight, bias = state[f"linear.{index}.weight"], state.get(f"linear.{index}.bias")
        if weight.ndim == 2:
            linears.append((weight, bias))
        elif weight.ndim == 1 and linears and len(linears) - 1 not in norms:
            norms[len(linears) - 1] = (weight, bias)
        else:
            raise HypernetworkError(f"{where}: linear.{index}.weight of shape "
                                    f"{tuple(weight.shape)} fits no Linear or LayerNorm slot")
    last = len(linears) - 1
    return tuple(HyperLayer(weight, bias,
                            activation != "linear" and (index < last or activate_output),
                            *norms.get(index, (None, None)))
                 for index, (weight, bias) in enumerate(linears))


def _setting(settings: Mapping[str, Any], key: str, default: Any) -> Any:
    value = settings.get(key, default)
    return default if value is None else value


def hypernetwork_from_dict(data: Mapping[Any, Any], name: str) -> Hypernetwork:
    """Build from an A1111 hypernetwork dict (int or digit-string width keys)."""
    activation = str(_setting(data, "activation_func", "linear")).lower()
    if activation not in ACTIVATIONS:
        raise HypernetworkError(f"{name}: activation_func {activation!r} is not supported; "
                                f"supported: {sorted(ACTIVATIONS)}")
    activate_output = bool(_setting(data, "activate_output", False))
    structure = _setting(data, "layer_structure", None)
    modules = {}
    for key, value in data.items():
        if not str(key).isdigit():
            continue
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise HypernetworkError(f"{name}: entry {key!r} should be [key MLP, value MLP]")
        pair = tuple(_layers(part, activation, activate_output, f"{name} [{key}][{slot}]")
                     for slot, part in enumerate(value))
        for layers in pair:
            if structure is not None and len(layers) != len(structure) - 1:
                raise HypernetworkError(
                    f"{name} [{key}]: {len(layers)} Linear layers but layer_structure "
                    f"{list(structure)} needs {len(structure) - 1}; the file is damaged")
        modules[int(key)] = (HyperModule(pair[0], activation), HyperModule(pair[1], activation))
    if not modules:
        raise HypernetworkError(f"{name}: no context-width entries (like '768'); this is not "
                                "an A1111 hypernetwork file")
    return Hypernetwork(name, MappingProxyType(modules))
