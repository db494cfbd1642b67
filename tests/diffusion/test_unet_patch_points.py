"""The UNet's patch points (engine/diffusion/networks/unet_patches.py): each is called at its
place with ComfyUI's arguments, and what it returns is what the network goes on with. The
references are computed independently: by editing a copy's weights to the same effect, by
recomputing attention by hand, or by recording a block's input with a forward hook."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor

from engine.diffusion.networks.unet import UNet, UNetFamily
from engine.diffusion.networks.unet_patches import UNetCall, UNetPatches
from tests.diffusion.test_unet import tiny_unet, unet_inputs

FAMILY = UNetFamily.SDXL  # tiny SDXL: attention at two levels, two transformer blocks deep
SD1 = UNetFamily.SD1


def sdxl_inputs(unet: UNet) -> dict[str, Tensor]:
    inputs = unet_inputs(unet.config)
    assert unet.config.adm_in_channels is not None
    inputs["y"] = torch.randn(2, unet.config.adm_in_channels,
                              generator=torch.Generator().manual_seed(3))
    return inputs


def run(unet: UNet, patches: UNetPatches | None = None, **options: Any) -> Tensor:
    inputs = sdxl_inputs(unet) if unet.config.adm_in_channels else unet_inputs(unet.config)
    call = None if patches is None else UNetCall(patches, dict(options))
    with torch.no_grad():
        return unet(**inputs, call=call)


def transformer_blocks(unet: UNet) -> list[Any]:
    from engine.diffusion.networks.attention import BasicTransformerBlock
    return [module for module in unet.modules() if isinstance(module, BasicTransformerBlock)]


def edited(unet: UNet, edit: Any) -> UNet:
    twin = copy.deepcopy(unet)
    with torch.no_grad():
        edit(twin)
    return twin


def test_empty_patches_leave_the_output_bit_identical() -> None:
    unet = tiny_unet(FAMILY)
    assert torch.equal(run(unet, UNetPatches()), run(unet))


def test_attn1_patch_sees_the_normed_tokens_as_query_key_and_value_source() -> None:
    unet = tiny_unet(FAMILY)
    seen: list[tuple[bool, bool, dict[str, Any]]] = []

    def patch(n: Tensor, context: Tensor, value: Tensor, options: dict[str, Any]) -> Any:
        seen.append((context is n, value is n, dict(options)))
        return n, context, value

    out = run(unet, UNetPatches(attn1_patch=(patch,)))
    assert torch.allclose(out, run(unet), atol=1e-6)
    assert len(seen) == len(transformer_blocks(unet))
    assert all(same_context and same_value for same_context, same_value, _ in seen)
    first = seen[0][2]
    assert first["block"] == ("input", 4) and first["block_index"] == 0
    assert (first["n_heads"], first["dim_head"]) == (4, 16)


def test_attn1_patch_result_is_what_self_attention_reads() -> None:
    unet = tiny_unet(FAMILY)

    def zero_values(n: Tensor, context: Tensor, value: Tensor, options: Any) -> Any:
        return n, context, torch.zeros_like(value)

    reference = edited(unet, lambda twin: [block.attn1.to_v.weight.zero_()
                                           for block in transformer_blocks(twin)])
    assert torch.allclose(run(unet, UNetPatches(attn1_patch=(zero_values,))), run(reference),
                          atol=1e-6)


def test_attn2_patch_gets_the_text_context_and_its_context_is_used() -> None:
    unet = tiny_unet(SD1)
    inputs = unet_inputs(unet.config)
    other = torch.randn_like(inputs["context"])
    contexts: list[Tensor] = []

    def swap(n: Tensor, context: Tensor, value: Tensor, options: Any) -> Any:
        contexts.append(context)
        return n, other, other

    with torch.no_grad():
        out = unet(**inputs, call=UNetCall(UNetPatches(attn2_patch=(swap,)), {}))
        reference = unet(**{**inputs, "context": other})
    assert all(torch.equal(context, inputs["context"]) for context in contexts)
    assert torch.allclose(out, reference, atol=1e-6)


def reference_attention(heads: int) -> Any:
    """softmax(q k^T / sqrt(d)) v over (B, T, heads * d) tensors, written out."""
    def attention(q: Tensor, k: Tensor, v: Tensor, options: dict[str, Any]) -> Tensor:
        assert options["n_heads"] == heads
        split = [t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)]
        scores = split[0] @ split[1].transpose(-1, -2) / split[0].shape[-1] ** 0.5
        out = scores.softmax(dim=-1) @ split[2]  # (B, heads, T, d)
        return out.transpose(1, 2).flatten(2)
    return attention


def test_attention_replacement_gets_projected_qkv_and_its_result_goes_through_to_out() -> None:
    unet = tiny_unet(SD1)
    replaced = UNetPatches().replacing_attention("attn1", ("input", 1), reference_attention(2))
    replaced = replaced.replacing_attention("attn2", ("input", 1), reference_attention(2))
    assert torch.allclose(run(unet, replaced), run(unet), atol=1e-5)


def test_attention_replacement_applies_only_to_its_block() -> None:
    unet = tiny_unet(FAMILY)
    blocks: list[Any] = []

    def zeros(q: Tensor, k: Tensor, v: Tensor, options: dict[str, Any]) -> Tensor:
        blocks.append((options["block"], options["block_index"]))
        return torch.zeros_like(q)

    out = run(unet, UNetPatches().replacing_attention("attn1", ("middle", 0), zeros))
    middle = unet.middle_block[1].transformer_blocks  # type: ignore[union-attr]
    reference = edited(unet, lambda twin: [block.attn1.to_v.weight.zero_()
                                           for block in twin.middle_block[1].transformer_blocks])
    assert blocks == [(("middle", 0), index) for index in range(len(middle))]
    assert torch.allclose(out, run(reference), atol=1e-6)


def test_a_transformer_keyed_replacement_wins_over_the_block_one() -> None:
    unet = tiny_unet(FAMILY)
    calls: list[str] = []

    def named(name: str) -> Any:
        def replace(q: Tensor, k: Tensor, v: Tensor, options: Any) -> Tensor:
            calls.append(f"{name}:{options['block_index']}")
            return torch.zeros_like(q)
        return replace

    patches = (UNetPatches().replacing_attention("attn2", ("middle", 0), named("block"))
               .replacing_attention("attn2", ("middle", 0, 1), named("one")))
    run(unet, patches)
    assert calls == ["block:0", "one:1"]


@pytest.mark.parametrize("point", ["attn1_output_patch", "attn2_output_patch"])
def test_attention_output_patch_result_is_added_to_the_tokens(point: str) -> None:
    unet = tiny_unet(FAMILY)
    attention = "attn1" if point.startswith("attn1") else "attn2"

    def silence(twin: UNet) -> None:
        for block in transformer_blocks(twin):
            getattr(block, attention).to_out[0].weight.zero_()
            getattr(block, attention).to_out[0].bias.zero_()

    patches = UNetPatches().adding(point, lambda n, options: torch.zeros_like(n))
    assert torch.allclose(run(unet, patches), run(edited(unet, silence)), atol=1e-6)


def test_middle_patch_runs_between_self_and_cross_attention() -> None:
    unet = tiny_unet(SD1)
    order: list[str] = []

    def note(name: str) -> Any:
        def patch(n: Tensor, *rest: Any) -> Any:
            order.append(name)
            return (n, *rest[:-1]) if len(rest) == 3 else n
        return patch

    patches = UNetPatches(attn1_output_patch=(note("attn1 out"),), middle_patch=(note("middle"),),
                          attn2_patch=(note("attn2 in"),))
    run(unet, patches)
    assert order[:3] == ["attn1 out", "middle", "attn2 in"]


def recorded_input(unet: UNet, module: torch.nn.Module, patches: UNetPatches) -> Tensor:
    """The first input `module` received during one patched forward."""
    seen: list[Tensor] = []
    handle = module.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    try:
        run(unet, patches)
    finally:
        handle.remove()
    return seen[0]


def doubled_at(block: tuple[str, int]) -> Any:
    def patch(h: Tensor, options: dict[str, Any]) -> Tensor:
        return h * 2 if options["block"] == block else h
    return patch


def test_input_block_patch_changes_the_next_block_and_the_skip() -> None:
    unet = tiny_unet(SD1)
    patches = UNetPatches(input_block_patch=(doubled_at(("input", 0)),))
    reference = edited(unet, lambda twin: (twin.input_blocks[0][0].weight.mul_(2),
                                           twin.input_blocks[0][0].bias.mul_(2)))
    assert torch.allclose(run(unet, patches), run(reference), atol=1e-5)


def test_input_block_patch_after_skip_changes_only_the_next_block() -> None:
    unet = tiny_unet(SD1)
    plain_next = recorded_input(unet, unet.input_blocks[1], UNetPatches())
    plain_last = recorded_input(unet, unet.output_blocks[-1], UNetPatches())
    patches = UNetPatches(input_block_patch_after_skip=(doubled_at(("input", 0)),))
    patched_next = recorded_input(unet, unet.input_blocks[1], patches)
    patched_last = recorded_input(unet, unet.output_blocks[-1], patches)
    skip_channels = unet.config.model_channels  # the last output block concatenates conv_in's
    assert torch.allclose(patched_next, plain_next * 2)
    assert torch.equal(patched_last[:, -skip_channels:], plain_last[:, -skip_channels:])


def test_middle_block_patch_result_feeds_the_output_blocks() -> None:
    unet = tiny_unet(SD1)
    patches = UNetPatches(middle_block_patch=(lambda h, options: torch.zeros_like(h),))
    first_output = recorded_input(unet, unet.output_blocks[0], patches)
    middle_channels = unet.config.model_channels * unet.config.channel_mult[-1]
    assert torch.count_nonzero(first_output[:, :middle_channels]) == 0
    assert torch.count_nonzero(first_output[:, middle_channels:]) > 0


def test_output_block_patch_gets_h_and_its_skip_and_both_results_are_concatenated() -> None:
    unet = tiny_unet(SD1)
    shapes: list[tuple[Any, ...]] = []

    def patch(h: Tensor, skip: Tensor, options: dict[str, Any]) -> tuple[Tensor, Tensor]:
        shapes.append((options["block"], tuple(h.shape[2:]), tuple(skip.shape[2:])))
        if options["block"] == ("output", 0):
            return h * 0, skip * 3
        return h, skip

    plain = recorded_input(unet, unet.output_blocks[0], UNetPatches())
    first_output = recorded_input(unet, unet.output_blocks[0],
                                  UNetPatches(output_block_patch=(patch,)))
    middle_channels = unet.config.model_channels * unet.config.channel_mult[-1]
    assert torch.count_nonzero(first_output[:, :middle_channels]) == 0
    assert torch.allclose(first_output[:, middle_channels:], plain[:, middle_channels:] * 3)
    assert [entry[0] for entry in shapes] == [("output", i) for i in range(6)]
    assert all(h_size == skip_size for _, h_size, skip_size in shapes)


def test_options_track_the_walk_through_the_network() -> None:
    unet = tiny_unet(FAMILY)
    seen: list[dict[str, Any]] = []

    def record(n: Tensor, context: Tensor, value: Tensor, options: dict[str, Any]) -> Any:
        seen.append(dict(options))
        return n, context, value

    run(unet, UNetPatches(attn2_patch=(record,)), cond_or_uncond=[1, 0], custom="kept")
    assert all(entry["original_shape"] == [2, 4, 8, 8] for entry in seen)
    assert all(entry["cond_or_uncond"] == [1, 0] and entry["custom"] == "kept" for entry in seen)
    walk = [(entry["block"], entry["transformer_index"], entry["block_index"]) for entry in seen]
    # tiny SDXL: input 4, 5 (one block each), input 7, 8 and middle (two each), then outputs
    assert walk[:6] == [(("input", 4), 0, 0), (("input", 5), 1, 0), (("input", 7), 2, 0),
                        (("input", 7), 2, 1), (("input", 8), 3, 0), (("input", 8), 3, 1)]
    assert seen[0]["activations_shape"] == [2, 64, 4, 4]
    assert seen[2]["activations_shape"] == [2, 64, 2, 2]


@pytest.mark.parametrize(("point", "key", "message"), [
    ("attn3_patch", None, "not a UNet patch point"),
    ("attn1", ("inside", 0), "block one of input, middle, output"),
    ("attn9", ("input", 1), "is not an attention to replace")])
def test_bad_patch_points_are_refused_with_the_valid_ones(point: str, key: Any,
                                                          message: str) -> None:
    with pytest.raises(ValueError, match=message):
        if key is None:
            UNetPatches().adding(point, lambda h, options: h)
        else:
            UNetPatches().replacing_attention(point, key, lambda q, k, v, o: q)


def test_a_non_callable_patch_is_refused() -> None:
    with pytest.raises(TypeError, match="must be callable"):
        UNetPatches().adding("input_block_patch", 3)  # type: ignore[arg-type]


def test_adding_returns_a_new_value_and_leaves_the_original_empty() -> None:
    original = UNetPatches()
    patched = original.adding("middle_block_patch", lambda h, options: h)
    assert original.empty and not patched.empty and len(patched.middle_block_patch) == 1
