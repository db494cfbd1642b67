"""ComfyUI V3's dynamic inputs (Autogrow, DynamicCombo, MatchType): their /object_info shape,
validation of the concrete "<parent>.<member>" inputs a prompt carries, the dict the node
receives, and editor files whose widgets follow a DynamicCombo's choice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.context import NodeContext
from engine.dynamic_inputs import (
    Autogrow,
    AutogrowNames,
    ComboOption,
    DynamicCombo,
    GroupedInputsNode,
    MatchType,
)
from engine.node import Float, Input, Int, Link, Node, NodeSchema, Output
from engine.schema import object_info_entry
from engine.workflow import ui_to_api
from tests.stubs import Engine, node


class Gather(GroupedInputsNode):
    """The INTs of an Autogrow input, as a list in socket order."""

    schema = NodeSchema("Gather", (Autogrow("values", Link("value", "INT"), "value", 2, 4),),
                        (Output("LIST"),), comfy_v3=True)

    def run(self, ctx: NodeContext, values: dict[str, int]) -> tuple[list[Any]]:
        return (list(values.items()),)


class Pick(GroupedInputsNode):
    """x, plus `amount` when the mode is "add"."""

    schema = NodeSchema(
        "Pick", (Link("x", "INT"),
                 DynamicCombo("mode", (ComboOption("add", (Int("amount", 1, min=0, max=10),)),
                                       ComboOption("keep")))),
        (Output("INT"),), comfy_v3=True)

    def run(self, ctx: NodeContext, x: int, mode: dict[str, Any]) -> tuple[int]:
        return (x + mode["amount"] if mode["mode"] == "add" else x,)


class Either(Node):
    schema = NodeSchema("Either", (MatchType("value", "either"),),
                        (Output("COMFY_MATCHTYPE_V3", "output", match_template="either"),),
                        comfy_v3=True)

    def execute(self, ctx: NodeContext, value: Any) -> tuple[Any]:
        return (value,)


class ShowAny(Node):
    schema = NodeSchema("ShowAny", (Link("value", "*"),), (), output_node=True)

    def execute(self, ctx: NodeContext, value: Any) -> tuple[()]:
        ctx.services.shown = value  # type: ignore[attr-defined]
        return ()


class Half(Node):
    schema = NodeSchema("Half", (Link("x", "INT"),), (Output("FLOAT"),))

    def execute(self, ctx: NodeContext, x: int) -> tuple[float]:
        return (x / 2,)


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = Engine(tmp_path)
    engine.registry.register_all((Gather, Pick, Either, ShowAny, Half))
    return engine


def shown(engine: Engine, api: dict[str, Any]) -> Any:
    engine.run(api)
    return engine.services.shown  # type: ignore[attr-defined]


def errors(engine: Engine, api: dict[str, Any], node_id: str) -> list[tuple[str, str]]:
    result = engine.validate(api)
    return [(e["type"], e["extra_info"].get("input_name")) for e in
            result.node_errors.get(node_id, {}).get("errors", [])]


def consts(*values: int) -> dict[str, Any]:
    return {str(10 + i): node("Const", value=v) for i, v in enumerate(values)}


def test_autogrow_is_published_with_its_template() -> None:
    entry = object_info_entry(Gather.schema)
    assert entry["input"]["required"]["values"] == ["COMFY_AUTOGROW_V3", {"template": {
        "input": {"required": {"value": ["INT", {"forceInput": True}]}},
        "max": 4, "min": 2, "prefix": "value"}}]


def test_autogrow_members_reach_the_node_as_one_dict_in_socket_order(engine: Engine) -> None:
    api = {**consts(5, 6, 7), "1": node("Gather", **{"values.value2": ["12", 0],
                                                     "values.value0": ["10", 0],
                                                     "values.value1": ["11", 0]}),
           "2": node("ShowAny", value=["1", 0])}
    assert shown(engine, api) == [("value0", 5), ("value1", 6), ("value2", 7)]


def test_autogrow_members_below_min_are_required(engine: Engine) -> None:
    api = {**consts(5), "1": node("Gather", **{"values.value0": ["10", 0]}),
           "2": node("ShowAny", value=["1", 0])}
    assert errors(engine, api, "1") == [("required_input_missing", "values.value1")]


def test_autogrow_member_links_are_type_checked(engine: Engine) -> None:
    api = {**consts(5, 6), "3": node("Half", x=["11", 0]),
           "1": node("Gather", **{"values.value0": ["10", 0], "values.value1": ["3", 0]}),
           "2": node("ShowAny", value=["1", 0])}
    assert errors(engine, api, "1") == [("return_type_mismatch", "values.value1")]


def test_dynamic_combo_gives_the_node_the_choice_and_its_inputs(engine: Engine) -> None:
    api = {**consts(5), "1": node("Pick", x=["10", 0], mode="add", **{"mode.amount": 3}),
           "2": node("ShowAny", value=["1", 0])}
    assert shown(engine, api) == 8


def test_dynamic_combo_checks_the_chosen_options_inputs(engine: Engine) -> None:
    api = {**consts(5), "1": node("Pick", x=["10", 0], mode="add", **{"mode.amount": 11}),
           "2": node("ShowAny", value=["1", 0])}
    assert errors(engine, api, "1") == [("value_bigger_than_max", "mode.amount")]


def test_dynamic_combo_rejects_an_unknown_choice(engine: Engine) -> None:
    api = {**consts(5), "1": node("Pick", x=["10", 0], mode="double"),
           "2": node("ShowAny", value=["1", 0])}
    assert errors(engine, api, "1") == [("value_not_in_list", "mode")]


def test_dynamic_combo_is_published_with_each_options_inputs() -> None:
    entry = object_info_entry(Pick.schema)
    assert entry["input"]["required"]["mode"] == ["COMFY_DYNAMICCOMBO_V3", {"options": [
        {"inputs": {"required": {"amount": ["INT", {"default": 1, "max": 10, "min": 0}]}},
         "key": "add"},
        {"inputs": {}, "key": "keep"}]}]


def test_match_type_passes_any_type_through(engine: Engine) -> None:
    api = {**consts(4), "3": node("Half", x=["10", 0]), "1": node("Either", value=["3", 0]),
           "4": node("Add", a=["1", 0], b=["10", 0]), "2": node("ShowAny", value=["4", 0])}
    assert errors(engine, api, "4") == []


def test_v3_entry_lists_hidden_kinds_and_output_matchtypes() -> None:
    entry = object_info_entry(Either.schema)
    assert entry["output_matchtypes"] == ["either"]
    assert entry["deprecated"] is False and entry["experimental"] is False
    assert entry["input"]["required"]["value"] == ["COMFY_MATCHTYPE_V3", {
        "template": {"allowed_types": "*", "template_id": "either"}}]


def editor_node(widgets: list[Any]) -> dict[str, Any]:
    return {"nodes": [{"id": 1, "type": "Pick", "mode": 0, "inputs": [], "outputs": [],
                       "widgets_values": widgets}], "links": []}


def test_editor_widgets_follow_the_dynamic_combo_choice() -> None:
    schemas = {"Pick": object_info_entry(Pick.schema)}
    assert ui_to_api(editor_node(["add", 4]), schemas)["1"]["inputs"] == {
        "mode": "add", "mode.amount": 4}
    assert ui_to_api(editor_node(["keep"]), schemas)["1"]["inputs"] == {"mode": "keep"}


class Blend(Node):
    schema = NodeSchema("Blend", (Link("x", "INT"), Float("factor", 0.5, min=0, max=1),
                                  Int("grow", 6, min=0, max=64, optional=True)),
                        (Output("FLOAT"),))

    def execute(self, ctx: NodeContext, x: int, factor: float, grow: int) -> tuple[float]:
        return (x * factor + grow,)


def test_a_widget_the_prompt_lacks_takes_its_default_with_a_log_line(
        engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    engine.registry.register(Blend)
    api = {**consts(4), "1": node("Blend", x=["10", 0]), "2": node("ShowAny", value=["1", 0])}
    with caplog.at_level("INFO", logger="loom.workflow"):
        assert shown(engine, api) == 8.0
    assert "node 1 (Blend) has no value for factor=0.5, grow=6" in caplog.text


def test_a_fixed_combo_without_default_takes_its_first_choice(engine: Engine) -> None:
    result = engine.validate({**consts(4), "1": node("Scale", x=["10", 0], factor=1.0),
                              "2": node("Show", x=["1", 0])})
    assert result.node_errors == {}
    assert result.prompt.nodes["1"].literals["mode"] == "round"


class Named(Node):
    schema = NodeSchema("Named", (Input("name", "STRING"),), (Output("STRING"),))

    def execute(self, ctx: NodeContext, name: str) -> tuple[str]:
        return (name,)


def test_a_widget_without_default_is_still_required(engine: Engine) -> None:
    engine.registry.register(Named)
    api = {"1": node("Named"), "2": node("Show", x=["1", 0])}
    assert errors(engine, api, "1") == [("required_input_missing", "name")]


def test_a_missing_dynamic_combo_takes_its_first_choice_and_that_options_defaults(
        engine: Engine) -> None:
    api = {**consts(5), "1": node("Pick", x=["10", 0]), "2": node("ShowAny", value=["1", 0])}
    assert shown(engine, api) == 6  # "add" with amount 1


def test_a_named_autogrow_lists_its_names_and_groups_present_members_in_that_order() -> None:
    spec = AutogrowNames("pair", Link("value", "INT"), ("left", "right", "extra"), min=2)
    schema = NodeSchema("Named", (spec,), (Output("INT"),), comfy_v3=True)
    entry = object_info_entry(schema)
    template = entry["input"]["required"]["pair"][1]["template"]
    assert template["names"] == ["left", "right", "extra"] and template["min"] == 2
    assert [(m.name, m.optional) for m in spec.dynamic.members(spec)] == [
        ("pair.left", False), ("pair.right", False), ("pair.extra", True)]
    assert spec.dynamic.group("pair", {"pair.right": 2, "pair.left": 1}) == {"left": 1, "right": 2}
