"""V3 nodes (comfy_api.latest) found through comfy_entrypoint register, validate and run like
Loom's own nodes."""

from __future__ import annotations

import torch

from engine.validation import validate_prompt
from tests.model_engine import ModelEngine, node, probed


def test_v3_schema_is_served_as_comfyuis_object_info(bound: ModelEngine) -> None:
    entry = bound.registry.object_info_for("V3ScaleImage", bound.services)
    assert entry["display_name"] == "Scale Image (V3)"
    assert entry["input"]["required"]["factor"] == ["FLOAT", {"default": 0.5, "min": 0.0,
                                                              "max": 1.0, "step": 0.1}]
    assert entry["input"]["required"]["mode"][1]["options"] == ["multiply", "invert"]
    assert entry["output"] == ["IMAGE"] and entry["output_name"] == ["scaled"]
    assert entry["python_module"] == "custom_nodes.v3_pack"


def test_a_value_outside_the_declared_range_fails_validation(bound: ModelEngine) -> None:
    api = {"image": node("EmptyImage", width=8, height=8, batch_size=1, color=0xFFFFFF),
           "scale": node("V3ScaleImage", image=["image", 0], factor=2.0, mode="multiply")}
    checked = validate_prompt(probed(api, "scale"), bound.registry, bound.services)
    errors = checked.node_errors["scale"]["errors"]
    assert errors[0]["extra_info"]["input_name"] == "factor"


def test_v3_node_runs_with_its_hidden_unique_id_and_ui(bound: ModelEngine) -> None:
    api = {"image": node("EmptyImage", width=8, height=8, batch_size=1, color=0xFFFFFF),
           "scale": node("V3ScaleImage", image=["image", 0], factor=0.5, mode="multiply")}
    result, _ = bound.run(probed(api, "scale"))
    assert torch.allclose(result.values["scale"][0][0], torch.full((1, 8, 8, 3), 0.5))
    assert result.outputs["scale"] == {"text": ["ran as node scale"]}


def test_v3_outputs_feed_other_nodes(bound: ModelEngine) -> None:
    api = {"one": node("V3AddOne", value=1), "two": node("V3AddOne", value=["one", 0])}
    result, _ = bound.run(probed(api, "two"))
    assert result.values["two"][0][0] == 3


def test_a_v3_node_that_expands_outputs_its_expansions_result(bound: ModelEngine) -> None:
    api = {"twice": node("V3AddOneTwice", value=3)}
    result, _ = bound.run(probed(api, "twice"))
    assert result.values["twice"][0] == [5]
    assert result.executed.count("twice.0.0.1") == 1 and "twice.0.0.2" in result.executed


def test_a_dynamic_combo_is_served_with_its_options(bound: ModelEngine) -> None:
    entry = bound.registry.object_info_for("V3Arithmetic", bound.services)
    kind, options = entry["input"]["required"]["operation"]
    assert kind == "COMFY_DYNAMICCOMBO_V3"
    assert [option["key"] for option in options["options"]] == ["add", "scale"]
    assert options["options"][1]["inputs"]["required"]["factor"][1]["max"] == 4


def test_a_dynamic_combo_node_gets_the_chosen_option_and_its_inputs_as_one_dict(
        bound: ModelEngine) -> None:
    api = {"scaled": node("V3Arithmetic", value=5, operation="scale",
                          **{"operation.factor": 3, "operation.offset": 1}),
           "added": node("V3Arithmetic", value=5, operation="add", **{"operation.amount": 4})}
    result, _ = bound.run(probed(api, "scaled", "added"))
    assert result.values["scaled"][0][0] == 16 and result.values["added"][0][0] == 9


def test_a_dynamic_combo_input_is_validated_against_its_option(bound: ModelEngine) -> None:
    api = {"scaled": node("V3Arithmetic", value=5, operation="scale",
                          **{"operation.factor": 9, "operation.offset": 1})}
    checked = validate_prompt(probed(api, "scaled"), bound.registry, bound.services)
    errors = checked.node_errors["scaled"]["errors"]
    assert errors[0]["extra_info"]["input_name"] == "operation.factor"


def test_an_autogrow_node_gets_the_connected_sockets_in_order(bound: ModelEngine) -> None:
    api = {"one": node("V3AddOne", value=0), "two": node("V3AddOne", value=1),
           "sum": node("V3SumAll", **{"terms.term0": ["one", 0], "terms.term1": ["two", 0],
                                      "terms.term2": 10})}
    result, _ = bound.run(probed(api, "sum"))
    assert result.values["sum"][0][0] == 13 and result.values["sum"][1][0] == "term0,term1,term2"
