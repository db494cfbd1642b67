"""Editor ("UI") workflows to API prompts, and reading workflows from files and PNGs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, features
from PIL.PngImagePlugin import PngInfo

from engine.workflow import (
    WorkflowFormatError,
    is_api_format,
    is_ui_format,
    read_workflow_file,
    to_api_prompt,
    ui_to_api,
)
from tests.recorded import data_json


def _schema(required: dict[str, Any], outputs: list[str], *, optional: dict[str, Any] | None = None,
            display_name: str | None = None) -> dict[str, Any]:
    """A small `/object_info` entry."""
    entry: dict[str, Any] = {
        "input": {"required": required},
        "input_order": {"required": list(required)},
        "output": outputs,
        "display_name": display_name,
    }
    if optional:
        entry["input"]["optional"] = optional
        entry["input_order"]["optional"] = list(optional)
    return entry


SEED = ["INT", {"default": 0, "min": 0, "control_after_generate": True}]
SCHEMAS: dict[str, dict[str, Any]] = {
    "Loader": _schema({"ckpt_name": [["a.safetensors", "b.safetensors"]]}, ["MODEL", "CLIP"],
                      display_name="Load Model"),
    "Sampler": _schema({"model": ["MODEL"], "seed": SEED, "steps": ["INT", {"default": 20}],
                        "sampler_name": [["euler", "heun"], {}], "latent": ["LATENT", {}]},
                       ["LATENT"], optional={"denoise": ["FLOAT", {"default": 1.0}]}),
    "PlainSeed": _schema({"seed": ["INT", {}], "label": ["STRING", {}]}, ["INT"]),
    "Encode": _schema({"clip": ["CLIP", {}], "text": ["STRING", {"multiline": True}]},
                      ["CONDITIONING"]),
    "ForcedText": _schema({"text": ["STRING", {"forceInput": True}], "count": ["INT", {}]},
                          ["STRING"]),
    "ModelPatch": _schema({"model": ["MODEL", {}], "strength": ["FLOAT", {"default": 1.0}]},
                          ["MODEL"]),
    "ClipThenModel": _schema({"clip": ["CLIP", {}], "model": ["MODEL", {}]}, ["MODEL"]),
    "EmptyLatent": _schema({"width": ["INT", {"default": 512}]}, ["LATENT"]),
    "SaveLatent": _schema({"samples": ["LATENT", {}], "filename_prefix": ["STRING", {}]}, []),
    "IntConst": _schema({"value": ["INT", {}]}, ["INT"]),
    "NewCombo": _schema({"mode": ["COMBO", {"options": ["x", "y"]}]}, ["STRING"]),
}


def slot(name: str, type_: str, link: int | None = None, widget: bool = False) -> dict[str, Any]:
    """One input slot of an editor node."""
    entry: dict[str, Any] = {"name": name, "type": type_, "link": link}
    if widget:
        entry["widget"] = {"name": name}
    return entry


def node(node_id: int, type_: str, inputs: list[dict[str, Any]] | None = None,
         widgets: Any = None, mode: int = 0, **extra: Any) -> dict[str, Any]:
    """One editor node."""
    body = {"id": node_id, "type": type_, "mode": mode, "inputs": inputs or [], "outputs": []}
    if widgets is not None:
        body["widgets_values"] = widgets
    body.update(extra)
    return body


def workflow(nodes: list[dict[str, Any]], links: list[list[Any]], **extra: Any) -> dict[str, Any]:
    return {"last_node_id": 99, "last_link_id": 99, "nodes": nodes, "links": links,
            "version": 0.4, **extra}


def loader(node_id: int = 1) -> dict[str, Any]:
    return node(node_id, "Loader", widgets=["a.safetensors"])


def sampler(node_id: int, model_link: int | None, **kw: Any) -> dict[str, Any]:
    inputs = [slot("model", "MODEL", model_link), slot("latent", "LATENT")]
    return node(node_id, "Sampler", inputs, kw.pop("widgets", [7, "fixed", 20, "euler", 1.0]),
                **kw)


# --- the real editor output ---------------------------------------------------------------


@pytest.mark.parametrize("ui_name, api_name", [
    ("default_workflow.json", "default_workflow_api.json"),
    ("default_workflow_1.58.1.json", "default_workflow_1.58.1_api.json"),
])
def test_default_workflows_convert_exactly_as_the_editor_saves_them(ui_name: str,
                                                                    api_name: str) -> None:
    schemas = data_json("compat/object_info_core.json")
    assert ui_to_api(data_json(f"compat/{ui_name}"), schemas) == data_json(f"compat/{api_name}")


# --- widgets --------------------------------------------------------------------------------


def test_control_after_generate_value_after_a_seed_is_skipped() -> None:
    api = ui_to_api(workflow([sampler(3, None, widgets=[42, "randomize", 25, "heun", 0.5])], []),
                    SCHEMAS)
    assert api["3"]["inputs"] == {"seed": 42, "steps": 25, "sampler_name": "heun", "denoise": 0.5}


def test_an_old_editors_boolean_control_value_after_a_seed_is_skipped() -> None:
    api = ui_to_api(workflow([sampler(3, None, widgets=[42, True, 25, "heun", 0.5])], []),
                    SCHEMAS)
    assert api["3"]["inputs"] == {"seed": 42, "steps": 25, "sampler_name": "heun", "denoise": 0.5}


def test_control_value_after_an_undeclared_int_is_skipped_when_the_list_is_too_long() -> None:
    api = ui_to_api(workflow([node(1, "PlainSeed", widgets=[5, "increment", "hello"])], []),
                    SCHEMAS)
    assert api["1"]["inputs"] == {"seed": 5, "label": "hello"}


def test_a_string_widget_whose_value_looks_like_a_control_value_is_kept() -> None:
    api = ui_to_api(workflow([node(1, "PlainSeed", widgets=[5, "fixed"])], []), SCHEMAS)
    assert api["1"]["inputs"] == {"seed": 5, "label": "fixed"}


def test_force_input_inputs_take_no_widget_position() -> None:
    api = ui_to_api(workflow([node(1, "ForcedText", widgets=[3])], []), SCHEMAS)
    assert api["1"]["inputs"] == {"count": 3}


def test_v3_combo_type_is_a_widget() -> None:
    api = ui_to_api(workflow([node(1, "NewCombo", widgets=["y"])], []), SCHEMAS)
    assert api["1"]["inputs"] == {"mode": "y"}


def test_widgets_values_given_as_a_dict_are_read_by_name() -> None:
    widgets = {"steps": 9, "seed": 1, "control_after_generate": "fixed", "sampler_name": "euler"}
    api = ui_to_api(workflow([sampler(3, None, widgets=widgets)], []), SCHEMAS)
    assert api["3"]["inputs"] == {"seed": 1, "steps": 9, "sampler_name": "euler"}


def test_a_widget_converted_to_an_input_takes_the_linked_value_and_keeps_its_position() -> None:
    consumer = sampler(3, None)
    consumer["inputs"].append(slot("steps", "INT", link=5, widget=True))
    graph = workflow([node(2, "IntConst", widgets=[30]), consumer], [[5, 2, 0, 3, 2, "INT"]])
    inputs = ui_to_api(graph, SCHEMAS)["3"]["inputs"]
    assert inputs == {"seed": 7, "steps": ["2", 0], "sampler_name": "euler", "denoise": 1.0}
    assert list(inputs) == ["seed", "steps", "sampler_name", "denoise"]


def test_linked_inputs_follow_widget_values_in_api_order() -> None:
    graph = workflow([loader(), sampler(3, 1)], [[1, 1, 0, 3, 0, "MODEL"]])
    assert list(ui_to_api(graph, SCHEMAS)["3"]["inputs"]) == [
        "seed", "steps", "sampler_name", "denoise", "model"]


# --- virtual, muted and bypassed nodes ------------------------------------------------------


def test_a_reroute_chain_is_followed_to_the_real_source() -> None:
    graph = workflow([
        loader(),
        node(2, "Reroute", [slot("", "*", 1)]),
        node(3, "Reroute", [slot("", "*", 2)]),
        node(4, "Encode", [slot("clip", "CLIP", 3)], widgets=["a cat"]),
    ], [[1, 1, 1, 2, 0, "CLIP"], [2, 2, 0, 3, 0, "CLIP"], [3, 3, 0, 4, 0, "CLIP"]])
    api = ui_to_api(graph, SCHEMAS)
    assert set(api) == {"1", "4"}
    assert api["4"]["inputs"] == {"text": "a cat", "clip": ["1", 1]}


def test_a_primitive_node_value_becomes_a_literal_input() -> None:
    consumer = sampler(3, None)
    consumer["inputs"].append(slot("seed", "INT", link=4, widget=True))
    graph = workflow([node(2, "PrimitiveNode", widgets=[777, "fixed"]), consumer],
                     [[4, 2, 0, 3, 2, "INT"]])
    api = ui_to_api(graph, SCHEMAS)
    assert set(api) == {"3"}
    assert api["3"]["inputs"]["seed"] == 777


def test_notes_are_dropped() -> None:
    graph = workflow([loader(), node(2, "Note", widgets=["hi"]),
                      node(3, "MarkdownNote", widgets=["# hi"])], [])
    assert set(ui_to_api(graph, SCHEMAS)) == {"1"}


def test_a_muted_node_and_the_links_from_it_are_dropped() -> None:
    graph = workflow([
        loader(),
        node(2, "ModelPatch", [slot("model", "MODEL", 1)], widgets=[0.5], mode=2),
        sampler(3, 2),
    ], [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"]])
    api = ui_to_api(graph, SCHEMAS)
    assert set(api) == {"1", "3"}
    assert "model" not in api["3"]["inputs"]


def test_a_bypassed_node_passes_its_input_of_the_same_type_through() -> None:
    graph = workflow([
        loader(),
        node(2, "ClipThenModel", [slot("clip", "CLIP", 1), slot("model", "MODEL", 2)], mode=4),
        sampler(3, 3),
    ], [[1, 1, 1, 2, 0, "CLIP"], [2, 1, 0, 2, 1, "MODEL"], [3, 2, 0, 3, 0, "MODEL"]])
    api = ui_to_api(graph, SCHEMAS)
    assert set(api) == {"1", "3"}
    assert api["3"]["inputs"]["model"] == ["1", 0]


def test_a_chain_of_two_bypassed_nodes_passes_through() -> None:
    graph = workflow([
        loader(),
        node(2, "ModelPatch", [slot("model", "MODEL", 1)], widgets=[0.5], mode=4),
        node(3, "ModelPatch", [slot("model", "MODEL", 2)], widgets=[0.7], mode=4),
        sampler(4, 3),
    ], [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"], [3, 3, 0, 4, 0, "MODEL"]])
    api = ui_to_api(graph, SCHEMAS)
    assert set(api) == {"1", "4"}
    assert api["4"]["inputs"]["model"] == ["1", 0]


def test_a_bypassed_node_without_an_input_of_the_type_leaves_the_input_absent() -> None:
    graph = workflow([
        loader(),
        node(2, "Encode", [slot("clip", "CLIP", 1)], widgets=["x"], mode=4),
        node(3, "SaveLatent", [slot("samples", "LATENT", 2)], widgets=["out"]),
    ], [[1, 1, 1, 2, 0, "CLIP"], [2, 2, 0, 3, 0, "LATENT"]])
    assert ui_to_api(graph, SCHEMAS)["3"]["inputs"] == {"filename_prefix": "out"}


def test_a_link_from_a_missing_node_leaves_the_input_absent() -> None:
    graph = workflow([sampler(3, 1)], [[1, 42, 0, 3, 0, "MODEL"]])
    assert "model" not in ui_to_api(graph, SCHEMAS)["3"]["inputs"]


def test_a_stale_link_the_target_no_longer_names_is_ignored() -> None:
    graph = workflow([loader(), loader(2), sampler(3, 7)],
                     [[6, 1, 0, 3, 0, "MODEL"], [7, 2, 0, 3, 0, "MODEL"]])
    assert ui_to_api(graph, SCHEMAS)["3"]["inputs"]["model"] == ["2", 0]


# --- subgraphs ------------------------------------------------------------------------------


def _sampler_subgraph() -> dict[str, Any]:
    """Definition "sg-sampler": a model input, a promoted seed widget, a LATENT output."""
    inner_sampler = node(7, "Sampler", [slot("model", "MODEL", 20), slot("latent", "LATENT", 21),
                                        slot("seed", "INT", 22, widget=True)],
                         widgets=[1, "fixed", 20, "euler", 1.0])
    return {
        "id": "sg-sampler", "name": "Sample", "version": 1,
        "inputNode": {"id": -10, "bounding": [0, 0, 120, 60]},
        "outputNode": {"id": -20, "bounding": [500, 0, 120, 60]},
        "inputs": [{"id": "u1", "name": "model", "type": "MODEL", "linkIds": [20]},
                   {"id": "u2", "name": "seed", "type": "INT", "linkIds": [22]}],
        "outputs": [{"id": "u3", "name": "LATENT", "type": "LATENT", "linkIds": [23]}],
        "widgets": [],
        "nodes": [inner_sampler, node(8, "EmptyLatent", widgets=[640])],
        "links": [
            {"id": 20, "origin_id": -10, "origin_slot": 0, "target_id": 7, "target_slot": 0,
             "type": "MODEL"},
            {"id": 21, "origin_id": 8, "origin_slot": 0, "target_id": 7, "target_slot": 1,
             "type": "LATENT"},
            {"id": 22, "origin_id": -10, "origin_slot": 1, "target_id": 7, "target_slot": 2,
             "type": "INT"},
            {"id": 23, "origin_id": 7, "origin_slot": 0, "target_id": -20, "target_slot": 0,
             "type": "LATENT"},
        ],
    }


def _instance_graph(instance_widgets: Any, **instance_extra: Any) -> dict[str, Any]:
    instance = node(2, "sg-sampler", [slot("model", "MODEL", 1),
                                      slot("seed", "INT", None, widget=True)],
                    widgets=instance_widgets, **instance_extra)
    save = node(3, "SaveLatent", [slot("samples", "LATENT", 2)], widgets=["out"])
    return workflow([loader(), instance, save],
                    [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "LATENT"]],
                    definitions={"subgraphs": [_sampler_subgraph()]})


def test_a_subgraph_instance_is_flattened_into_prefixed_inner_nodes() -> None:
    api = ui_to_api(_instance_graph([42]), SCHEMAS)
    assert set(api) == {"1", "2:7", "2:8", "3"}
    assert api["2:7"]["inputs"] == {"seed": 42, "steps": 20, "sampler_name": "euler",
                                    "denoise": 1.0, "model": ["1", 0], "latent": ["2:8", 0]}
    assert api["2:8"]["inputs"] == {"width": 640}
    assert api["3"]["inputs"]["samples"] == ["2:7", 0]


def test_an_inner_widget_keeps_its_own_value_when_the_instance_has_none() -> None:
    api = ui_to_api(_instance_graph([]), SCHEMAS)
    assert api["2:7"]["inputs"]["seed"] == 1


def test_proxy_widget_values_reach_the_inner_widgets_they_name() -> None:
    proxies = [["7", "steps"], ["-1", "seed"], ["7", "control_after_generate"]]
    api = ui_to_api(_instance_graph([33, 99, "fixed"], properties={"proxyWidgets": proxies}),
                    SCHEMAS)
    assert (api["2:7"]["inputs"]["steps"], api["2:7"]["inputs"]["seed"]) == (33, 99)


def test_a_muted_subgraph_instance_is_dropped_whole() -> None:
    graph = _instance_graph([42])
    graph["nodes"][1]["mode"] = 2
    api = ui_to_api(graph, SCHEMAS)
    assert set(api) == {"1", "3"}
    assert "samples" not in api["3"]["inputs"]


def test_nested_subgraph_ids_chain_the_instance_ids() -> None:
    inner = {
        "id": "sg-inner", "name": "Patch",
        "inputs": [{"name": "model", "type": "MODEL", "linkIds": [1]}],
        "outputs": [{"name": "MODEL", "type": "MODEL", "linkIds": [2]}],
        "nodes": [node(2, "ModelPatch", [slot("model", "MODEL", 1)], widgets=[0.5])],
        "links": [{"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 2,
                   "target_slot": 0, "type": "MODEL"},
                  {"id": 2, "origin_id": 2, "origin_slot": 0, "target_id": -20,
                   "target_slot": 0, "type": "MODEL"}],
    }
    outer = {
        "id": "sg-outer", "name": "Wrap",
        "inputs": [{"name": "model", "type": "MODEL", "linkIds": [5]}],
        "outputs": [{"name": "MODEL", "type": "MODEL", "linkIds": [6]}],
        "nodes": [node(3, "sg-inner", [slot("model", "MODEL", 5)])],
        "links": [[5, -10, 0, 3, 0, "MODEL"], [6, 3, 0, -20, 0, "MODEL"]],
    }
    graph = workflow([loader(), node(5, "sg-outer", [slot("model", "MODEL", 1)]), sampler(6, 2)],
                     [[1, 1, 0, 5, 0, "MODEL"], [2, 5, 0, 6, 0, "MODEL"]],
                     definitions={"subgraphs": [outer, inner]})
    api = ui_to_api(graph, SCHEMAS)
    assert set(api) == {"1", "5:3:2", "6"}
    assert api["5:3:2"]["inputs"] == {"strength": 0.5, "model": ["1", 0]}
    assert api["6"]["inputs"]["model"] == ["5:3:2", 0]


def test_a_subgraph_that_contains_itself_is_rejected() -> None:
    loop = {"id": "sg-loop", "inputs": [], "outputs": [], "links": [],
            "nodes": [node(1, "sg-loop")]}
    graph = workflow([node(1, "sg-loop")], [], definitions={"subgraphs": [loop]})
    with pytest.raises(WorkflowFormatError, match="contains itself"):
        ui_to_api(graph, SCHEMAS)


# --- unknown classes, titles, broken input --------------------------------------------------


def test_an_unknown_class_keeps_its_links_and_named_widget_values() -> None:
    graph = workflow([loader(), node(2, "Mystery", [slot("model", "MODEL", 1)],
                                     widgets={"amount": 3})], [[1, 1, 0, 2, 0, "MODEL"]])
    assert ui_to_api(graph, SCHEMAS)["2"] == {
        "inputs": {"amount": 3, "model": ["1", 0]}, "class_type": "Mystery",
        "_meta": {"title": "Mystery"}}


def test_an_unknown_class_drops_positional_widget_values_it_cannot_name() -> None:
    graph = workflow([node(2, "Mystery", widgets=[1, 2])], [])
    assert ui_to_api(graph, SCHEMAS)["2"]["inputs"] == {}


def test_title_is_the_node_title_then_the_display_name_then_the_type() -> None:
    graph = workflow([loader(1), node(2, "Loader", widgets=["b.safetensors"], title="Mine"),
                      node(3, "EmptyLatent", widgets=[64])], [])
    api = ui_to_api(graph, SCHEMAS)
    titles = [api[key]["_meta"]["title"] for key in ("1", "2", "3")]
    assert titles == ["Load Model", "Mine", "EmptyLatent"]


@pytest.mark.parametrize("broken, complaint", [
    ([1, 2], "JSON object"),
    ({"nodes": {"1": {}}}, "'nodes' must be a list"),
    ({"nodes": ["KSampler"]}, r"nodes\[0\] must be an object"),
    ({"nodes": [{"type": "Loader"}]}, r"nodes\[0\]\.id"),
    ({"nodes": [loader()], "links": [[1, 2]]}, r"links\[0\]"),
    ({"nodes": [loader(), loader()]}, "used twice"),
    ({"nodes": [], "definitions": {"subgraphs": [{"name": "x"}]}}, "string 'id'"),
])
def test_structurally_broken_workflows_raise_a_clear_error(broken: Any, complaint: str) -> None:
    with pytest.raises(WorkflowFormatError, match=complaint):
        ui_to_api(broken, SCHEMAS)


# --- format detection -----------------------------------------------------------------------


API_PROMPT = {"1": {"class_type": "Loader", "inputs": {"ckpt_name": "a.safetensors"}}}


def test_format_detection_tells_api_prompts_from_editor_workflows() -> None:
    ui = workflow([loader()], [])
    assert (is_api_format(API_PROMPT), is_ui_format(API_PROMPT)) == (True, False)
    assert (is_api_format(ui), is_ui_format(ui)) == (False, True)
    assert not is_api_format({}) and not is_ui_format([])


def test_to_api_prompt_accepts_both_formats() -> None:
    assert to_api_prompt({1: API_PROMPT["1"]}, SCHEMAS) == API_PROMPT
    assert to_api_prompt(workflow([loader()], []), SCHEMAS)["1"]["class_type"] == "Loader"


def test_to_api_prompt_names_what_is_wrong_with_other_data() -> None:
    with pytest.raises(WorkflowFormatError, match="entry '1' is not a node with a 'class_type'"):
        to_api_prompt({"1": {"inputs": {}}}, SCHEMAS)


# --- files ----------------------------------------------------------------------------------


def test_a_json_file_is_read_as_whichever_format_it_holds(tmp_path: Path) -> None:
    api_file, ui_file = tmp_path / "api.json", tmp_path / "ui.json"
    ui = workflow([loader()], [])
    api_file.write_text(json.dumps(API_PROMPT))
    ui_file.write_text(json.dumps(ui))
    assert read_workflow_file(api_file) == (API_PROMPT, None)
    assert read_workflow_file(ui_file) == (None, ui)


def test_a_json_file_that_is_not_json_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(WorkflowFormatError, match=r"bad\.json is not valid JSON"):
        read_workflow_file(bad)


def test_a_json_file_in_neither_format_is_rejected(tmp_path: Path) -> None:
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"hello": "world"}))
    with pytest.raises(WorkflowFormatError, match=r"odd\.json: expected an API prompt"):
        read_workflow_file(odd)


def test_a_png_carrying_prompt_and_workflow_chunks_yields_both(tmp_path: Path) -> None:
    ui = workflow([loader()], [])
    info = PngInfo()
    info.add_text("prompt", json.dumps(API_PROMPT))
    info.add_itxt("workflow", json.dumps(ui))
    path = tmp_path / "image.png"
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    assert read_workflow_file(path) == (API_PROMPT, ui)


def test_a_png_carrying_only_a_workflow_yields_it(tmp_path: Path) -> None:
    ui = workflow([loader()], [])
    info = PngInfo()
    info.add_text("workflow", json.dumps(ui))
    path = tmp_path / "image.png"
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    assert read_workflow_file(path) == (None, ui)


def test_a_png_without_workflow_chunks_raises_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(WorkflowFormatError, match=r"plain\.png: .*no 'prompt' or 'workflow'"):
        read_workflow_file(path)


def test_a_png_chunk_that_is_not_json_names_the_chunk(tmp_path: Path) -> None:
    info = PngInfo()
    info.add_text("prompt", "{broken")
    path = tmp_path / "image.png"
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    with pytest.raises(WorkflowFormatError, match="the 'prompt' metadata is not valid JSON"):
        read_workflow_file(path)


def test_a_file_that_is_neither_json_nor_an_image_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(WorkflowFormatError, match="not an image Pillow can read"):
        read_workflow_file(path)


def test_a_webp_with_comfyui_exif_metadata_yields_both(tmp_path: Path) -> None:
    if not features.check("webp"):
        pytest.skip("this Pillow build has no WebP support")
    ui = workflow([loader()], [])
    image = Image.new("RGB", (4, 4))
    exif = image.getexif()
    exif[0x0110] = "prompt:" + json.dumps(API_PROMPT)  # ComfyUI's WebP: EXIF Model and Make
    exif[0x010F] = "workflow:" + json.dumps(ui)
    path = tmp_path / "image.webp"
    image.save(path, exif=exif)
    assert read_workflow_file(path) == (API_PROMPT, ui)
