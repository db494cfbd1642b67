"""Legacy editor group nodes (`extra.groupNodes`, instances typed `workflow/<name>`) expanded."""

from __future__ import annotations

from typing import Any

import pytest

from engine.workflow import WorkflowFormatError, ui_to_api
from tests.test_workflow_convert import SCHEMAS, loader, node, slot, workflow


def _group() -> dict[str, Any]:
    """Loader-fed sampler group: a reroute carries the model in, a patch sits before the sampler.

    Inner nodes: 0 Reroute (group edge), 1 ModelPatch (strength), 2 EmptyLatent (width),
    3 Sampler (seed + control, steps, sampler_name, denoise). Exposed inputs: the reroute's
    MODEL; outputs: the sampler's LATENT (the patch's and latent's are linked inside)."""
    inner = [
        node(0, "Reroute", [slot("", "*")], index=0),
        node(1, "ModelPatch", [slot("model", "MODEL")], [1.0], index=1),
        node(2, "EmptyLatent", [], [512], index=2),
        node(3, "Sampler", [slot("model", "MODEL"), slot("latent", "LATENT")],
             [1, "fixed", 20, "euler", 1.0], index=3),
    ]
    links = [[None, 0, 0, 0, 1, "MODEL"], [0, 0, 1, 0, 5, "MODEL"], [1, 0, 3, 0, 6, "MODEL"],
             [2, 0, 3, 1, 7, "LATENT"]]
    return {"nodes": inner, "links": links, "external": []}


def _graph(instance_type: str = "workflow/Sample", widgets: Any = None,
           **instance_extra: Any) -> dict[str, Any]:
    values = [0.5, 768, 42, "randomize", 8, "heun", 0.7] if widgets is None else widgets
    instance = node(5, instance_type, [slot("model", "MODEL", 1)], values, **instance_extra)
    save = node(6, "SaveLatent", [slot("samples", "LATENT", 2)], ["out"])
    links = [[1, 1, 0, 5, 0, "MODEL"], [2, 5, 0, 6, 0, "LATENT"]]
    return workflow([loader(), instance, save], links, extra={"groupNodes": {"Sample": _group()}})


def test_an_instance_becomes_its_inner_nodes_numbered_by_instance_and_index() -> None:
    api = ui_to_api(_graph(), SCHEMAS)
    assert sorted(api) == ["1", "5:1", "5:2", "5:3", "6"]
    assert [api[key]["class_type"] for key in ("5:1", "5:2", "5:3")] == \
        ["ModelPatch", "EmptyLatent", "Sampler"]


def test_the_instances_widget_values_are_spread_in_order_skipping_the_seed_control() -> None:
    api = ui_to_api(_graph(), SCHEMAS)
    assert api["5:1"]["inputs"]["strength"] == 0.5
    assert api["5:2"]["inputs"]["width"] == 768
    assert {key: api["5:3"]["inputs"][key] for key in ("seed", "steps", "sampler_name",
                                                        "denoise")} == \
        {"seed": 42, "steps": 8, "sampler_name": "heun", "denoise": 0.7}


def test_an_instance_input_reaches_the_inner_node_through_a_boundary_reroute() -> None:
    api = ui_to_api(_graph(), SCHEMAS)
    assert api["5:1"]["inputs"]["model"] == ["1", 0]


def test_inner_links_join_the_inner_nodes() -> None:
    api = ui_to_api(_graph(), SCHEMAS)
    assert api["5:3"]["inputs"]["model"] == ["5:1", 0]
    assert api["5:3"]["inputs"]["latent"] == ["5:2", 0]


def test_a_link_from_an_instance_output_comes_from_the_inner_producer() -> None:
    api = ui_to_api(_graph(), SCHEMAS)
    assert api["6"]["inputs"]["samples"] == ["5:3", 0]


def test_the_newer_workflow_arrow_type_name_expands_the_same_way() -> None:
    assert ui_to_api(_graph("workflow>Sample"), SCHEMAS) == ui_to_api(_graph(), SCHEMAS)


def test_inner_nodes_keep_their_own_values_when_the_instance_saves_none() -> None:
    api = ui_to_api(_graph(widgets=[]), SCHEMAS)
    assert api["5:1"]["inputs"]["strength"] == 1.0
    assert api["5:3"]["inputs"]["seed"] == 1


def test_a_muted_instance_drops_all_its_inner_nodes() -> None:
    api = ui_to_api(_graph(mode=2), SCHEMAS)
    assert sorted(api) == ["1", "6"]


def test_an_unlinked_inner_input_is_exposed_after_the_earlier_nodes_inputs() -> None:
    group = _group()
    group["links"] = group["links"][:-1]  # the latent is no longer linked inside
    graph = _graph()
    graph["extra"]["groupNodes"]["Sample"] = group
    graph["nodes"][1]["inputs"].append(slot("latent", "LATENT", 3))
    graph["nodes"].append(node(7, "EmptyLatent", [], [64]))
    graph["links"].append([3, 7, 0, 5, 1, "LATENT"])
    api = ui_to_api(graph, SCHEMAS)
    assert api["5:3"]["inputs"]["latent"] == ["7", 0]


def test_a_widget_converted_to_a_socket_on_an_inner_node_is_the_last_input() -> None:
    group = _group()
    group["nodes"][1]["inputs"].append(slot("strength", "FLOAT", widget=True))
    graph = _graph(widgets=[768, 42, "fixed", 8, "heun", 0.7, 0.25])
    graph["extra"]["groupNodes"]["Sample"] = group
    graph["nodes"][1]["inputs"].append(slot("strength", "FLOAT", 3))
    graph["nodes"].append(node(7, "FloatConst", [], [0.9]))
    graph["links"].append([3, 7, 0, 5, 1, "FLOAT"])
    api = ui_to_api(graph, {**SCHEMAS, "FloatConst": {"input": {}, "output": ["FLOAT"]}})
    assert api["5:1"]["inputs"]["strength"] == ["7", 0]
    assert api["5:2"]["inputs"]["width"] == 768


def test_a_group_type_without_a_definition_is_left_as_an_unknown_node() -> None:
    graph = _graph("workflow/Missing")
    assert ui_to_api(graph, SCHEMAS)["5"]["class_type"] == "workflow/Missing"


def test_a_link_to_an_input_the_definition_does_not_expose_is_rejected() -> None:
    graph = _graph()
    graph["links"].append([3, 1, 0, 5, 4, "MODEL"])
    with pytest.raises(WorkflowFormatError, match="node 5 .*has no input 4"):
        ui_to_api(graph, SCHEMAS)


def test_a_malformed_definition_names_the_group() -> None:
    graph = _graph()
    graph["extra"]["groupNodes"]["Sample"] = {"nodes": "oops", "links": []}
    with pytest.raises(WorkflowFormatError, match="group node 'Sample'"):
        ui_to_api(graph, SCHEMAS)


def test_a_primitive_inside_the_group_takes_its_value_from_the_instance() -> None:
    inner = [node(0, "PrimitiveNode", [], [20, "fixed"], index=0),
             node(1, "Sampler", [slot("model", "MODEL"), slot("latent", "LATENT"),
                                 slot("steps", "INT", widget=True)],
                  [1, "fixed", 20, "euler", 1.0], index=1)]
    group = {"nodes": inner, "links": [[0, 0, 1, 2, 9, "INT"]], "external": []}
    instance = node(5, "workflow>Steps", [slot("model", "MODEL", 1)],
                    [12, "fixed", 42, "randomize", "heun", 0.5])
    graph = workflow([loader(), instance], [[1, 1, 0, 5, 0, "MODEL"]],
                     extra={"groupNodes": {"Steps": group}})
    inputs = ui_to_api(graph, SCHEMAS)["5:1"]["inputs"]
    assert {key: inputs[key] for key in ("steps", "seed", "sampler_name", "denoise", "model")} \
        == {"steps": 12, "seed": 42, "sampler_name": "heun", "denoise": 0.5, "model": ["1", 0]}
