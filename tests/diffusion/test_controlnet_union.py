"""ControlNet-Union (xinsir's SDXL "ControlNet++"): the released diffusers layout, loading, and
ComfyUI's forward rule: the multi-hot control-type embedding added to the time embedding, and
with a selected type the pooled hint token (plus the type's task vector) run through the
fusion transformer and added to the hint features as a per-channel bias ("auto": neither the
type term's one-hot nor the fusion)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.diffusion.checkpoints.controlnet_diffusers import (
    diffusers_to_original,
    original_to_diffusers,
)
from engine.diffusion.checkpoints.controlnet_loader import CONTROL_PREFIX
from engine.diffusion.checkpoints.controlnet_writer import (
    controlnet_config,
    random_controlnet,
    write_random_union_controlnet,
)
from engine.diffusion.checkpoints.writer import randomize
from engine.diffusion.networks.controlnet import ControlNet
from engine.diffusion.networks.unet import timestep_embedding
from tests.diffusion.controlnet_testing import control_inputs, diffusers_kwargs, load
from tests.numerics import rel_err

TOLERANCE = 1e-4


def union_network(types: int = 8, seed: int = 0) -> ControlNet:
    network = ControlNet(controlnet_config("sdxl_base", union_types=types))
    randomize(network, torch.Generator().manual_seed(seed))
    return network.eval().requires_grad_(False)


def reference_forward(network: ControlNet, inputs: dict, selected: list[int]) -> list:
    """ComfyUI's union forward written out step by step from the network's own blocks."""
    unet = network.config.unet
    emb = network.time_embed(timestep_embedding(inputs["timesteps"], unet.model_channels))
    hot = torch.zeros(network.config.union_types)
    hot[selected] = 1.0
    type_term = timestep_embedding(hot, 256).reshape(1, -1)
    embedding = network.control_add_embedding
    emb = emb + embedding.linear_2(F.silu(embedding.linear_1(type_term)))
    emb = emb + network.label_emb["0"](inputs["y"])
    guided = network.input_hint_block(inputs["hint"])
    if selected:
        token = guided.mean(dim=(2, 3)) + network.task_embedding[selected[0]]
        block = network.transformer_layes[0]
        x = token[:, None]
        attention = torch.nn.MultiheadAttention(token.shape[1], 8, batch_first=True)
        attention.in_proj_weight.data = block.attn.in_proj_weight
        attention.in_proj_bias.data = block.attn.in_proj_bias
        attention.out_proj.load_state_dict(block.attn.out_proj.state_dict())
        normed = block.ln_1(x)
        x = x + attention(normed, normed, normed, need_weights=False)[0]
        hidden = block.mlp["c_fc"](block.ln_2(x))
        x = x + block.mlp["c_proj"](hidden * torch.sigmoid(1.702 * hidden))
        guided = guided + network.spatial_ch_projs(x[:, 0])[:, :, None, None]
    h, outputs = inputs["x"], []
    for index, (stage, zero_conv) in enumerate(zip(network.input_blocks, network.zero_convs,
                                                   strict=True)):
        h = stage(h, emb, inputs["context"])
        if index == 0:
            h = h + guided
        outputs.append(zero_conv(h))
    h = network.middle_block(h, emb, inputs["context"])
    return [*outputs, network.middle_block_out(h)]


def ours(network: ControlNet, inputs: dict, selected: tuple[int, ...]) -> list:
    with torch.no_grad():
        down, mid = network(inputs["x"], inputs["hint"], inputs["timesteps"],
                            inputs["context"], inputs["y"], selected)
    return [*down, mid]


# --- layout --------------------------------------------------------------------------------


def test_full_size_union_layout_is_diffusers_controlnet_union_model() -> None:
    from diffusers import ControlNetUnionModel

    config = controlnet_config("sdxl_base", tiny=False, union_types=8)
    tensors, _ = random_controlnet("sdxl_base", tiny=False, meta=True, union_types=8)
    written = original_to_diffusers({k.removeprefix(CONTROL_PREFIX): v
                                     for k, v in tensors.items()})
    with torch.device("meta"):
        reference = ControlNetUnionModel(**diffusers_kwargs(config), num_control_type=8)
    assert {k: tuple(v.shape) for k, v in written.items()} == \
        {k: tuple(v.shape) for k, v in reference.state_dict().items()}


def test_diffusers_names_round_trip_to_the_original_layout() -> None:
    tensors, _ = random_controlnet("sdxl_base", meta=True, union_types=6)
    original = {k.removeprefix(CONTROL_PREFIX): v for k, v in tensors.items()}
    assert diffusers_to_original(original_to_diffusers(original)).keys() == original.keys()


def test_comfyuis_in_proj_spelling_loads_too() -> None:
    tensors, _ = random_controlnet("sdxl_base", meta=True, union_types=6)
    written = original_to_diffusers({k.removeprefix(CONTROL_PREFIX): v
                                     for k, v in tensors.items()})
    comfy = {k.replace(".attn.in_proj_", ".attn.in_proj."): v for k, v in written.items()}
    assert diffusers_to_original(comfy).keys() == diffusers_to_original(written).keys()


def test_the_written_file_loads_as_a_union_controlnet_with_its_weights(tmp_path: Path) -> None:
    path = write_random_union_controlnet(tmp_path / "union.safetensors", types=6, seed=4)
    loaded = load(path).network
    assert isinstance(loaded, ControlNet) and loaded.config.union_types == 6
    expected, _ = random_controlnet("sdxl_base", seed=4, union_types=6)
    state = loaded.state_dict()
    assert all(torch.equal(state[k.removeprefix(CONTROL_PREFIX)], v) for k, v in expected.items())


# --- forward -------------------------------------------------------------------------------


@pytest.mark.parametrize("selected", [(), (3,), (7,)])
def test_residuals_follow_comfyuis_union_rule(selected: tuple[int, ...]) -> None:
    network = union_network()
    inputs = control_inputs(network.config, batch=2)
    with torch.no_grad():
        expected = reference_forward(network, inputs, list(selected))
    for got, want in zip(ours(network, inputs, selected), expected, strict=True):
        assert rel_err(got, want) <= TOLERANCE


def test_the_fusion_block_is_a_clip_residual_attention_block() -> None:
    from diffusers.models.controlnets.controlnet_union import ResidualAttentionBlock

    network = union_network(seed=2)
    block = network.transformer_layes[0]
    reference = ResidualAttentionBlock(block.ln_1.normalized_shape[0], 8)
    reference.load_state_dict(block.state_dict())
    x = torch.randn(3, 2, block.ln_1.normalized_shape[0])
    with torch.no_grad():  # nn.MultiheadAttention is sequence-first
        expected = reference(x.transpose(0, 1)).transpose(0, 1)
        assert rel_err(block(x), expected) <= TOLERANCE


def test_the_type_selects_a_different_control() -> None:
    network = union_network()
    inputs = control_inputs(network.config, batch=1)
    auto, depth, canny = (ours(network, inputs, s) for s in ((), (1,), (3,)))
    assert not torch.allclose(auto[0], depth[0])
    assert not torch.allclose(depth[0], canny[0])


def test_a_plain_controlnet_ignores_the_control_type() -> None:
    network = ControlNet(controlnet_config("sdxl_base"))
    randomize(network, torch.Generator().manual_seed(1))
    inputs = control_inputs(network.config, batch=1)
    for got, want in zip(ours(network, inputs, (3,)), ours(network, inputs, ()), strict=True):
        assert torch.equal(got, want)
