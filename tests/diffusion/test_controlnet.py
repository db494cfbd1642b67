"""ControlNet and T2I-Adapter: the released key layout, parity with diffusers on identical random
weights, every file layout the loader accepts, diff ControlNets, and the runtime control
(strength, start/end percent, hint resize and batch rules, chaining)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from engine.diffusion.checkpoints.controlnet_diffusers import diffusers_to_original
from engine.diffusion.checkpoints.controlnet_loader import CONTROL_PREFIX, DIFF_MARKER
from engine.diffusion.checkpoints.controlnet_writer import (
    adapter_config,
    controlnet_config,
    random_controlnet,
    random_t2i_adapter,
)
from engine.diffusion.checkpoints.loader import strip_prefix
from engine.diffusion.checkpoints.state_files import CheckpointError
from engine.diffusion.networks.controlnet import ControlNet, detect_config
from engine.diffusion.networks.t2i_adapter import T2IAdapter, build_adapter, from_diffusers
from engine.diffusion.networks.unet import UNet, UNetConfig, UNetFamily
from engine.diffusion.patches.control import Control, ControlModel, broadcast_hint, resize_hint
from tests.diffusion.controlnet_testing import (
    control_inputs,
    diffusers_kwargs,
    diffusers_twin,
    load,
    run_diffusers,
    run_ours,
    save,
    tiny_controlnet,
    tiny_model,
)
from tests.diffusion.manifests import manifest
from tests.numerics import rel_err

PARITY_TOLERANCE = 1e-4
KINDS = ("sd15", "sd21v", "sdxl_base")

# --- layout --------------------------------------------------------------------------------


def test_full_size_writer_matches_the_released_sd15_layout_exactly() -> None:
    tensors, _ = random_controlnet("sd15", tiny=False, meta=True)
    got = {key: ("F32" if value.dtype == torch.float32 else str(value.dtype), tuple(value.shape))
           for key, value in tensors.items()}
    assert got == manifest("controlnet_sd15")


def test_architecture_is_detected_from_the_released_shapes() -> None:
    tensors, _ = random_controlnet("sd15", tiny=False, meta=True)
    shapes = {key: tuple(value.shape) for key, value in strip_prefix(tensors,
                                                                     CONTROL_PREFIX).items()}
    assert detect_config(shapes) == controlnet_config("sd15", tiny=False)


@pytest.mark.parametrize("kind", ["sd21v", "sdxl_base"])
def test_sd2_and_sdxl_architectures_are_detected_from_their_shapes(kind: str) -> None:
    config = controlnet_config(kind, tiny=False)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ControlNet(config).state_dict().items()}
    assert detect_config(shapes) == config


def test_diffusers_names_map_onto_the_full_size_layout() -> None:
    from diffusers import ControlNetModel

    for kind in KINDS:
        config = controlnet_config(kind, tiny=False)
        with torch.device("meta"):
            ours = ControlNet(config).state_dict()
            theirs = ControlNetModel(**diffusers_kwargs(config)).state_dict()
        renamed = diffusers_to_original(theirs)
        assert {k: v.shape for k, v in renamed.items()} == {k: v.shape for k, v in ours.items()}


# --- parity with diffusers -----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_residuals_match_diffusers_controlnet_model(kind: str) -> None:
    network = tiny_controlnet(kind)
    inputs = control_inputs(network.config)
    down, mid = run_ours(network, inputs)
    expected_down, expected_mid = run_diffusers(diffusers_twin(network), inputs)
    assert len(down) == len(expected_down) == len(network.input_blocks)
    for got, expected in zip([*down, mid], [*expected_down, expected_mid], strict=True):
        assert got.shape == expected.shape
        assert rel_err(got, expected) <= PARITY_TOLERANCE


def flat(residuals: tuple) -> list[torch.Tensor]:
    down, mid = residuals
    return [*down, mid]


def test_a_single_hint_image_is_shared_by_the_batch() -> None:
    network = tiny_controlnet()
    inputs = control_inputs(network.config)
    shared = {**inputs, "hint": inputs["hint"][:1]}
    expanded = {**inputs, "hint": inputs["hint"][:1].expand(2, -1, -1, -1)}
    for got, expected in zip(flat(run_ours(network, shared)), flat(run_ours(network, expanded)),
                             strict=True):
        assert rel_err(got, expected) <= 1e-5  # batch 1 vs 2 convs round differently


def test_hint_of_the_wrong_size_names_the_expected_shape() -> None:
    network = tiny_controlnet()
    inputs = control_inputs(network.config)
    with pytest.raises(ValueError, match=r"\(1 or 2, 3, 64, 64\)"):
        run_ours(network, {**inputs, "hint": inputs["hint"][:, :, :32]})


@pytest.mark.slow
def test_full_size_sd15_residuals_match_diffusers_in_fp32() -> None:
    network = ControlNet(controlnet_config("sd15", tiny=False))
    from engine.diffusion.checkpoints.writer import randomize

    randomize(network, torch.Generator().manual_seed(0))
    inputs = control_inputs(network.config, height=64, width=64)
    down, mid = run_ours(network.eval(), inputs)
    expected_down, expected_mid = run_diffusers(diffusers_twin(network), inputs)
    for got, expected in zip([*down, mid], [*expected_down, expected_mid], strict=True):
        assert rel_err(got, expected) <= PARITY_TOLERANCE


# --- file layouts --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd15", "sdxl_base"])
def test_diffusers_layout_file_gives_the_original_layout_residuals(tmp_path, kind: str) -> None:
    tensors, metadata = random_controlnet(kind)
    original = load(save(tmp_path / "original.safetensors", tensors, metadata)).network
    twin_state = diffusers_twin(original).state_dict()
    converted = load(save(tmp_path / "diffusers.safetensors", twin_state, metadata)).network
    inputs = control_inputs(original.config)
    for got, expected in zip(flat(run_ours(converted, inputs)), flat(run_ours(original, inputs)),
                             strict=True):
        assert torch.equal(got, expected)


def test_keys_without_the_control_model_prefix_load_the_same(tmp_path) -> None:
    tensors, metadata = random_controlnet()
    bare = strip_prefix(tensors, CONTROL_PREFIX)
    with_prefix = load(save(tmp_path / "a.safetensors", tensors, metadata)).network
    without = load(save(tmp_path / "b.safetensors", bare, metadata)).network
    assert all(torch.equal(without.state_dict()[k], v) for k, v in with_prefix.state_dict().items())


def test_unknown_file_is_rejected_naming_what_was_found(tmp_path) -> None:
    path = save(tmp_path / "x.safetensors", {"foo.bar.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"could not detect.*foo\.bar"):
        load(path)


def test_control_lora_is_named_as_unsupported(tmp_path) -> None:
    path = save(tmp_path / "x.safetensors", {"lora_controlnet": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="Control-LoRA"):
        load(path)


def test_shuffle_files_pool_residuals_over_space(tmp_path) -> None:
    tensors, metadata = random_controlnet()
    assert load(save(tmp_path / "control_v11e_sd15_shuffle.safetensors", tensors, metadata)
                ).global_average_pooling
    assert not load(save(tmp_path / "canny.safetensors", tensors, metadata)
                    ).global_average_pooling


# --- diff ControlNets ----------------------------------------------------------------------


class AddOne:
    """A patch adding 1 to one UNet weight while applied (stands in for a LoRA)."""

    def apply(self, module: torch.nn.Module):  # noqa: ANN201 - the Patch protocol's Undo
        weight = module.get_parameter("input_blocks.0.0.bias")
        saved = weight.data.clone()
        weight.data += 1

        def undo() -> None:
            weight.data.copy_(saved)
        return undo


def test_diff_controlnet_is_the_patched_base_plus_the_delta(tmp_path) -> None:
    config = controlnet_config("sd15")
    base = tiny_model(config.unet, "sd1")
    base = base.replace(patches=(AddOne(),))
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    deltas, metadata = random_controlnet("sd15", seed=4)
    path = save(tmp_path / "diff.safetensors", {**deltas, DIFF_MARKER: torch.zeros(1)}, metadata)
    loaded = load(path, base).network.state_dict()
    for key, value in loaded.items():
        delta = deltas[CONTROL_PREFIX + key]
        expected = before[key] + delta if key in before else delta
        if key == "input_blocks.0.0.bias":
            expected = expected + 1
        assert torch.allclose(value, expected, atol=1e-6), key
    assert all(torch.equal(v, before[k]) for k, v in base.unet.state_dict().items())


def test_diff_controlnet_without_a_model_asks_for_diff_controlnet_loader(tmp_path) -> None:
    deltas, metadata = random_controlnet()
    path = save(tmp_path / "diff.safetensors", {**deltas, DIFF_MARKER: torch.zeros(1)}, metadata)
    with pytest.raises(CheckpointError, match="DiffControlNetLoader"):
        load(path)


# --- runtime control -----------------------------------------------------------------------


def sd15_setup(strength: float = 1.0, **kwargs) -> tuple[Control, dict, ControlModel]:
    model = ControlModel(tiny_controlnet(), "cn")
    inputs = control_inputs(model.network.config)
    return Control(model, inputs["hint"], strength, **kwargs), inputs, model


def call(control: Control, inputs: dict, sigma: float = 1.0):
    return control.residuals(inputs["x"], inputs["timesteps"], inputs["context"], inputs["y"],
                             torch.full((inputs["x"].shape[0],), sigma))


def test_zero_strength_gives_zero_residuals() -> None:
    control, inputs, _ = sd15_setup(strength=0.0)
    down, mid = call(control, inputs)
    assert all(torch.count_nonzero(r) == 0 for r in [*down, mid])


def test_strength_scales_the_network_residuals() -> None:
    control, inputs, model = sd15_setup(strength=0.5)
    down, mid = call(control, inputs)
    expected_down, expected_mid = run_ours(model.network, inputs)
    for got, expected in zip([*down, mid], [*expected_down, expected_mid], strict=True):
        assert torch.allclose(got, 0.5 * expected)


def test_chained_controls_add_their_residuals() -> None:
    first, inputs, _ = sd15_setup(strength=0.5)
    other = ControlModel(tiny_controlnet(seed=9), "other")
    second = Control(other, inputs["hint"], 2.0, previous=first)
    own = Control(other, inputs["hint"], 2.0)
    for total, a, b in zip(flat(call(second, inputs)), flat(call(first, inputs)),
                           flat(call(own, inputs)), strict=True):
        assert torch.allclose(total, a + b)


def test_start_and_end_percent_gate_by_the_model_sigmas() -> None:
    control, inputs, model = sd15_setup(start_percent=0.25, end_percent=0.5)
    handle = tiny_model(model.network.config.unet, "sd1")
    control.prepare(handle, inputs["x"].shape)
    high = handle.sampling.percent_to_sigma(0.25)
    low = handle.sampling.percent_to_sigma(0.5)
    assert call(control, inputs, high * 1.01) == (None, None)
    assert call(control, inputs, low * 0.99) == (None, None)
    assert call(control, inputs, (high + low) / 2)[1] is not None


def test_an_inactive_link_still_passes_on_the_previous_residuals() -> None:
    always, inputs, model = sd15_setup()
    late = Control(model, inputs["hint"], 1.0, 0.9, 1.0, previous=always)
    late.prepare(tiny_model(model.network.config.unet, "sd1"), inputs["x"].shape)
    assert torch.equal(call(late, inputs, 10.0)[1], call(always, inputs, 10.0)[1])


def test_a_percent_range_needs_prepare_first() -> None:
    control, inputs, _ = sd15_setup(start_percent=0.5)
    with pytest.raises(RuntimeError, match="prepare"):
        call(control, inputs)


def test_prepare_rejects_a_controlnet_of_another_family() -> None:
    control, inputs, _ = sd15_setup()
    sdxl = tiny_model(controlnet_config("sdxl_base").unet, "sdxl")
    with pytest.raises(ValueError, match="made for sdxl"):
        control.prepare(sdxl, inputs["x"].shape)


def test_hint_is_resized_to_the_latent_pixel_size_nearest_exact_centre_crop() -> None:
    control, inputs, model = sd15_setup()
    image = torch.rand(1, 3, 100, 60)
    resized = Control(model, image)
    # aspect 60/100 < 1: rows round((100 - 100 * 0.6) / 2) = 20 .. 80 are kept
    expected_hint = F.interpolate(image[:, :, 20:80], size=(64, 64), mode="nearest-exact")
    expected = run_ours(model.network, {**inputs, "hint": expected_hint})
    for got, want in zip(flat(call(resized, inputs)), flat(expected), strict=True):
        assert torch.allclose(got, want)


def test_resize_hint_follows_comfyui_common_upscale_centre_crop() -> None:
    from nodes.imaging import resize

    for shape, (height, width) in (((2, 3, 100, 60), (64, 64)), ((1, 3, 30, 90), (40, 56)),
                                   ((1, 3, 64, 64), (48, 80))):
        image = torch.rand(shape)
        assert torch.equal(resize_hint(image, height, width),
                           resize(image, width, height, "nearest-exact", "center"))


def test_hint_batch_rule() -> None:
    images = torch.arange(3.0).view(3, 1, 1, 1)
    assert broadcast_hint(images[:1], 4).shape[0] == 1  # one image broadcasts
    assert broadcast_hint(images, 5).flatten().tolist() == [0, 1, 2, 0, 1]
    assert broadcast_hint(images, 2).flatten().tolist() == [0, 1]
    assert broadcast_hint(images, 4, chunks=2).flatten().tolist() == [0, 1, 0, 1]


# --- T2I-Adapters --------------------------------------------------------------------------


def block_shapes(config: UNetConfig, height: int = 8, width: int = 8) -> list[torch.Size]:
    """Output shapes of each UNet input block, then the middle block."""
    unet = UNet(config)
    shapes: list[torch.Size] = []
    for stage in [*unet.input_blocks, unet.middle_block]:
        stage.register_forward_hook(lambda _m, _i, out: shapes.append(out.shape))
    y = None if config.adm_in_channels is None else torch.zeros(1, config.adm_in_channels)
    with torch.no_grad():
        unet(torch.zeros(1, 4, height, width), torch.zeros(1), torch.zeros(1, 1,
                                                                            config.context_dim), y)
    return shapes


@pytest.mark.parametrize(("kind", "family", "mult"), [
    ("full", UNetFamily.SD1, (1, 2, 4, 4)), ("light", UNetFamily.SD1, (1, 2, 4, 4)),
    ("full_xl", UNetFamily.SDXL, (1, 2, 4))])
def test_adapter_features_fit_the_unet_blocks_they_are_added_to(kind, family, mult) -> None:
    config = dataclasses.replace(UNetConfig.tiny(family), channel_mult=mult,
                                 transformer_depth=(0,) * len(mult))
    shapes = block_shapes(config)
    adapter = build_adapter(adapter_config(kind))
    with torch.no_grad():
        features = adapter(torch.rand(1, 3, 64, 64))
    assert len(features.input) == len(shapes) - 1
    placed = [i for i, feature in enumerate(features.input) if feature is not None]
    assert placed == ([3, 5, 8] if kind == "full_xl" else [2, 5, 8, 11])
    for index in placed:
        assert features.input[index].shape == shapes[index]
    assert (features.middle is None) == (kind != "full_xl")
    if features.middle is not None:
        assert features.middle.shape == shapes[-1]


@pytest.mark.parametrize(("kind", "diffusers_type"), [
    ("full", "full_adapter"), ("light", "light_adapter"), ("full_xl", "full_adapter_xl")])
def test_adapter_matches_diffusers_and_loads_its_layout(kind, diffusers_type) -> None:
    from diffusers import T2IAdapter as DiffusersAdapter

    from engine.diffusion.checkpoints.writer import randomize

    config = adapter_config(kind)
    channels = config.channels[:3] if kind == "light" else config.channels
    reference = DiffusersAdapter(in_channels=3, channels=list(channels),
                                 num_res_blocks=config.blocks_per_level,
                                 downscale_factor=config.unshuffle, adapter_type=diffusers_type)
    randomize(reference, torch.Generator().manual_seed(2))
    ours = build_adapter(config)
    ours.load_state_dict(from_diffusers(reference.state_dict()), strict=True)
    hint = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        expected = reference(hint)
        features = ours(hint)
    got = [f for f in features.input if f is not None] + (
        [features.middle] if features.middle is not None else [])
    for value, want in zip(got, expected, strict=True):
        assert rel_err(value, want) <= PARITY_TOLERANCE


def test_diffusers_layout_adapter_file_loads_like_the_original(tmp_path) -> None:
    from diffusers import T2IAdapter as DiffusersAdapter

    config = adapter_config("full")
    reference = DiffusersAdapter(in_channels=3, channels=list(config.channels),
                                 num_res_blocks=2, downscale_factor=8)
    loaded = load(save(tmp_path / "adapter.safetensors", reference.state_dict())).network
    assert isinstance(loaded, T2IAdapter) and loaded.config == config
    hint = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        got = [f for f in loaded(hint).input if f is not None]
        expected = reference(hint)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected, strict=True))


def test_adapter_file_through_the_control_loader_adds_input_residuals(tmp_path) -> None:
    model = load(save(tmp_path / "t2iadapter_canny.safetensors",
                      random_t2i_adapter("full", hint_channels=1)))
    assert isinstance(model.network, T2IAdapter) and model.network.config.hint_channels == 1
    control = Control(model, torch.rand(1, 3, 64, 64), strength=0.5)
    x = torch.zeros(2, 4, 8, 8)
    args = (x, torch.ones(2), torch.zeros(2, 1, 64), None, torch.ones(2))
    assert control.residuals(*args) == (None, None)
    extra = control.input_residuals(*args)
    with torch.no_grad():
        unscaled = model.network(control.hint)  # 64 x 64 already: no resize
    assert [e is None for e in extra] == [f is None for f in unscaled.input]
    assert torch.allclose(extra[2], 0.5 * unscaled.input[2])


def test_input_residuals_reach_the_unet() -> None:
    config = dataclasses.replace(UNetConfig.tiny(UNetFamily.SD1), channel_mult=(1, 2, 4, 4),
                                 transformer_depth=(1, 1, 1, 0))
    handle = tiny_model(config, "sd1")
    adapter = build_adapter(adapter_config("full"))
    features = adapter(torch.rand(1, 3, 64, 64))
    args = (torch.randn(1, 4, 8, 8), torch.ones(1), torch.randn(1, 7, config.context_dim))
    with torch.no_grad():
        plain = handle.unet(*args)
        zero = handle.unet(*args, input_residuals=[None if f is None else f * 0
                                                   for f in features.input])
        steered = handle.unet(*args, input_residuals=list(features.input))
    assert torch.equal(plain, zero) and not torch.allclose(plain, steered)
