"""comfy.lora.calculate_weight with the adapters load_lora returns: old-style (kind, weights)
tuples compute what their adapter does, strength_model and offsets apply as in ComfyUI, and
what Loom cannot apply is named."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from tests.model_engine import ModelEngine

KEY = "diffusion_model.w.weight"


def randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


FILES = {
    "lora": {"m.lora_up.weight": randn(6, 2, seed=1), "m.lora_down.weight": randn(2, 5, seed=2),
             "m.alpha": torch.tensor(1.0), "m.dora_scale": randn(6, 1, seed=3).abs() + 0.5},
    "loha": {"m.hada_w1_a": randn(6, 2, seed=4), "m.hada_w1_b": randn(2, 5, seed=5),
             "m.hada_w2_a": randn(6, 2, seed=6), "m.hada_w2_b": randn(2, 5, seed=7),
             "m.alpha": torch.tensor(4.0)},
    "lokr": {"m.lokr_w1": randn(2, 1, seed=8), "m.lokr_w2_a": randn(3, 2, seed=9),
             "m.lokr_w2_b": randn(2, 5, seed=10), "m.alpha": torch.tensor(1.0)},
}


def adapter(kind: str) -> Any:
    import comfy.lora
    return comfy.lora.load_lora(FILES[kind], {"m": KEY})[KEY]


@pytest.mark.parametrize("kind", sorted(FILES))
def test_an_old_style_weights_tuple_computes_what_its_adapter_does(bound: ModelEngine,
                                                                   kind: str) -> None:
    import comfy.lora
    weight = randn(6, 5, seed=0)
    found = adapter(kind)
    by_object = comfy.lora.calculate_weight([(0.7, found, 1.0, None, None)], weight.clone(), KEY)
    by_tuple = comfy.lora.calculate_weight([(0.7, (kind, found.weights), 1.0, None, None)],
                                           weight.clone(), KEY)
    assert found.name == kind and torch.equal(by_object, by_tuple)
    assert not torch.allclose(by_object, weight)


def test_an_adapter_adds_strength_times_looms_delta(bound: ModelEngine) -> None:
    import comfy.lora
    weight, found = randn(6, 5, seed=0), adapter("loha")
    expected = weight + 0.5 * found.adapter.weight_delta(weight)
    patched = comfy.lora.calculate_weight([(0.5, found, 1.0, None, None)], weight.clone(), KEY)
    assert torch.allclose(patched, expected)


def test_strength_model_and_offset_narrow_and_scale_before_the_adapter(bound: ModelEngine
                                                                       ) -> None:
    import comfy.lora
    found, weight = adapter("lokr"), randn(9, 5, seed=0)  # rows 3..8 are the adapted weight
    patched = comfy.lora.calculate_weight([(0.5, found, 2.0, (0, 3, 6), None)], weight.clone(),
                                          KEY)
    region = 2.0 * weight[3:]
    assert torch.equal(patched[:3], weight[:3])
    assert torch.allclose(patched[3:], region + 0.5 * found.adapter.weight_delta(region))


def test_a_lora_tuple_asking_to_pad_the_weight_is_refused_naming_the_key(bound: ModelEngine
                                                                         ) -> None:
    import comfy.lora
    up, down, alpha, mid, dora_scale, _ = adapter("lora").weights
    entry = (1.0, ("lora", (up, down, alpha, mid, dora_scale, [8, 5])), 1.0, None, None)
    with pytest.raises(ValueError, match="diffusion_model.w.weight.*reshape_weight"):
        comfy.lora.calculate_weight([entry], randn(6, 5, seed=0), KEY)


def test_a_patch_type_loom_has_no_math_for_is_named(bound: ModelEngine) -> None:
    import comfy.lora
    from loom_model_options import UnsupportedPatchError
    with pytest.raises(UnsupportedPatchError, match="patch type 'glora'"):
        comfy.lora.calculate_weight([(1.0, ("glora", ()), 1.0, None, None)],
                                    randn(6, 5, seed=0), KEY)


def test_load_lora_gives_diff_patches_for_full_and_bias_differences(bound: ModelEngine) -> None:
    import comfy.lora
    diff, bias = randn(6, 5, seed=1), randn(6, seed=2)
    loaded = comfy.lora.load_lora({"m.diff": diff, "m.diff_b": bias}, {"m": KEY})
    assert loaded[KEY][0] == "diff" and torch.equal(loaded[KEY][1][0], diff)
    assert torch.equal(loaded["diffusion_model.w.bias"][1][0], bias)


def test_a_tuple_key_records_its_offset_and_function(bound: ModelEngine) -> None:
    from loom_weight_patches import record_patches
    recorded: dict[str, list[Any]] = {}
    key = ("w", (0, 1, 2), torch.neg)
    added = record_patches(recorded, {key: "patch", "unknown": "patch"}, {"w"}, 0.5, 1.0)
    assert added == [key] and recorded == {"w": [(0.5, "patch", 1.0, (0, 1, 2), torch.neg)]}


def test_a_wrapper_changing_a_weights_shape_is_named(bound: ModelEngine,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import comfy.lora
    from loom_model_options import UnsupportedPatchError
    from loom_weight_patches import pack_weight_patch
    monkeypatch.setattr(comfy.lora, "calculate_weight",
                        lambda patches, weight, key, *rest: torch.zeros(8, 5))
    layer = torch.nn.Linear(5, 6)
    patch = pack_weight_patch({"diffusion_model.weight": [(1.0, (torch.ones(6, 5),), 1.0)]})
    with pytest.raises(UnsupportedPatchError, match=r"shape \(8, 5\) for 'diffusion_model.weight'"):
        patch.apply(layer)
