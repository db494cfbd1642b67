"""A1111 hypernetworks: the .pt format read safely, the safetensors form, and the cross-attention
hook (key/value context = c + mlp(c) * strength) set only while the patch is applied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from engine.diffusion.checkpoints.addon_files import load_hypernetwork
from engine.diffusion.checkpoints.state_files import CheckpointError
from engine.diffusion.networks.attention import CrossAttention
from engine.diffusion.networks.unet import UNet, UNetConfig, UNetFamily
from engine.diffusion.patches.hypernetwork import Hypernetwork, HypernetworkError, HypernetworkPatch
from engine.diffusion.patches.patching import patched

WIDTH = 24  # the tiny SD1 UNet's context width


def a1111_mlp(width: int, seed: int, layer_norm: bool = True) -> nn.Sequential:
    """The A1111 layout for layer_structure [1, 2, 1], relu, optional LayerNorm, dropout on:
    Linear, ReLU, LayerNorm, Dropout, Linear, LayerNorm (no activation on the output)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(width, 2 * width), nn.ReLU()]
    layers += [nn.LayerNorm(2 * width)] if layer_norm else []
    layers += [nn.Dropout(0.3), nn.Linear(2 * width, width)]
    layers += [nn.LayerNorm(width)] if layer_norm else []
    sequential = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for param in sequential.parameters():
            param.add_(torch.randn_like(param) * 0.2)  # norms away from exactly 1 / 0
    return sequential


class Wrapper(nn.Module):
    """A1111's HypernetworkModule: its Sequential is stored as `linear`."""

    def __init__(self, sequential: nn.Sequential) -> None:
        super().__init__()
        self.linear = sequential


def write_pt(path: Path, pairs: dict[int, tuple[nn.Sequential, nn.Sequential]],
             **settings) -> Path:
    data = {width: [Wrapper(k).state_dict(), Wrapper(v).state_dict()]
            for width, (k, v) in pairs.items()}
    data |= {"layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": True,
             "use_dropout": True, "activate_output": False, "name": "test", "step": 100,
             "sd_checkpoint": "abc", "sd_checkpoint_name": "model"} | settings
    torch.save(data, path)
    return path


def load_allowed_pt(path: Path) -> Hypernetwork:
    """A .pt hypernetwork as Loom reads it under --allow-pickle-checkpoints."""
    return load_hypernetwork(path, allow_pickle=True)


def reference_attention(attention: CrossAttention, x: Tensor, key_context: Tensor,
                        value_context: Tensor) -> Tensor:
    def heads(t: Tensor) -> Tensor:
        return t.view(t.shape[0], t.shape[1], attention.heads, -1).transpose(1, 2)

    q, k, v = (heads(attention.to_q(x)), heads(attention.to_k(key_context)),
               heads(attention.to_v(value_context)))
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    return attention.to_out[0](out)


@pytest.fixture(scope="module")
def unet() -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig.tiny(UNetFamily.SD1)).eval().requires_grad_(False)


def cross_attention(unet: UNet) -> CrossAttention:
    return unet.input_blocks[1][1].transformer_blocks[0].attn2


def test_pt_hypernetwork_rewrites_cross_attention_keys_and_values(unet, tmp_path: Path) -> None:
    key_mlp, value_mlp = a1111_mlp(WIDTH, 1), a1111_mlp(WIDTH, 2)
    hyper = load_allowed_pt(write_pt(tmp_path / "h.pt", {WIDTH: (key_mlp, value_mlp)}))
    attention = cross_attention(unet)
    x, context = torch.randn(2, 16, 32), torch.randn(2, 7, WIDTH)
    plain = attention(x, context)
    with patched(unet, [HypernetworkPatch(hyper, 0.6)]):
        hooked = attention(x, context)
    with torch.no_grad():
        expected = reference_attention(attention, x, context + key_mlp(context) * 0.6,
                                       context + value_mlp(context) * 0.6)
    assert torch.allclose(hooked, expected, atol=1e-5)
    assert not torch.allclose(hooked, plain, atol=1e-3)
    assert attention.context_hook is None and torch.equal(attention(x, context), plain)


def test_self_attention_is_left_alone(unet, tmp_path: Path) -> None:
    hyper = load_allowed_pt(write_pt(tmp_path / "h.pt", {32: (a1111_mlp(32, 1),
                                                                a1111_mlp(32, 2))}))
    with patched(unet, [HypernetworkPatch(hyper, 1.0)]):
        assert all(module.context_hook is None for module in unet.modules()
                   if isinstance(module, CrossAttention))


def test_two_hypernetworks_stack_in_order(unet, tmp_path: Path) -> None:
    first = (a1111_mlp(WIDTH, 3, layer_norm=False), a1111_mlp(WIDTH, 4, layer_norm=False))
    second = (a1111_mlp(WIDTH, 5), a1111_mlp(WIDTH, 6))
    patches = [HypernetworkPatch(load_allowed_pt(write_pt(
                   tmp_path / "a.pt", {WIDTH: first}, is_layer_norm=False)), 1.0),
               HypernetworkPatch(load_allowed_pt(write_pt(tmp_path / "b.pt",
                                                            {WIDTH: second})), 0.5)]
    attention = cross_attention(unet)
    x, context = torch.randn(1, 16, 32), torch.randn(1, 7, WIDTH)
    with patched(unet, patches):
        hooked = attention(x, context)
    with torch.no_grad():
        key, value = context + first[0](context), context + first[1](context)
        key, value = key + second[0](key) * 0.5, value + second[1](value) * 0.5
        expected = reference_attention(attention, x, key, value)
    assert torch.allclose(hooked, expected, atol=1e-5)
    assert attention.context_hook is None


def test_safetensors_form_matches_the_pt_file(unet, tmp_path: Path) -> None:
    key_mlp, value_mlp = a1111_mlp(WIDTH, 7), a1111_mlp(WIDTH, 8)
    from_pt = load_allowed_pt(write_pt(tmp_path / "h.pt", {WIDTH: (key_mlp, value_mlp)}))
    tensors = {f"{WIDTH}.{slot}.{key}": value.contiguous()
               for slot, mlp in enumerate((key_mlp, value_mlp))
               for key, value in Wrapper(mlp).state_dict().items()}
    metadata = {"layer_structure": json.dumps([1, 2, 1]), "activation_func": "relu",
                "is_layer_norm": "true"}
    save_file(tensors, str(tmp_path / "h.safetensors"), metadata=metadata)
    from_safetensors = load_hypernetwork(tmp_path / "h.safetensors")
    context = torch.randn(1, 5, WIDTH)
    for left, right in zip(from_pt.modules[WIDTH], from_safetensors.modules[WIDTH], strict=True):
        assert torch.equal(left(context), right(context))


class NotWeights:
    """Any class: unpickling it would run code, so weights_only loading must refuse it."""


def test_pt_files_are_loaded_without_running_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({WIDTH: [{}, {}], "payload": NotWeights()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_allowed_pt(path)


def test_pt_files_are_refused_unless_pickles_are_allowed(tmp_path: Path) -> None:
    path = write_pt(tmp_path / "h.pt", {WIDTH: (a1111_mlp(WIDTH, 1), a1111_mlp(WIDTH, 2))})
    with pytest.raises(CheckpointError, match="--allow-pickle-checkpoints"):
        load_hypernetwork(path)


def test_unknown_activation_and_wrong_structure_are_explained(tmp_path: Path) -> None:
    pair = {WIDTH: (a1111_mlp(WIDTH, 1), a1111_mlp(WIDTH, 2))}
    with pytest.raises(HypernetworkError, match="activation_func 'softmax2d'"):
        load_allowed_pt(write_pt(tmp_path / "a.pt", pair, activation_func="softmax2d"))
    with pytest.raises(HypernetworkError, match="layer_structure"):
        load_allowed_pt(write_pt(tmp_path / "b.pt", pair, layer_structure=[1, 2, 2, 1]))
