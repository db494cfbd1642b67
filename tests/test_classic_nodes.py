"""Custom-node packs in ComfyUI's classic protocol: loading, schema, and running in the engine."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest

from engine.classic import adapt_classic
from engine.context import Services
from engine.custom_nodes import load_custom_nodes
from engine.events import RecordingListener
from engine.executor import ExecutionResult, Executor
from engine.node import Link, Node, NodeSchema, Output, String
from engine.paths import Paths
from engine.registry import NodeRegistry
from engine.schema import object_info_entry
from engine.validation import ValidationResult, validate_prompt

REPO_CUSTOM_NODES = Path(__file__).resolve().parent.parent / "custom_nodes"

# Nodes shared by several tests: a constant source, and an output node that shows its input.
COMMON = '''
class Const:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": -100, "max": 100})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    def run(self, value):
        return (value,)

class Show:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*",)}}
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    def run(self, value):
        return {"ui": {"value": [value]}}
'''


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


def pack(folder: Path, name: str, body: str, mappings: str) -> Path:
    """A single-file pack: COMMON nodes + `body`, with NODE_CLASS_MAPPINGS = {mappings}."""
    source = COMMON + textwrap.dedent(body) + f"\nNODE_CLASS_MAPPINGS = {{{mappings}}}\n"
    return write(folder / f"{name}.py", source)


def loaded(folder: Path, **kwargs: Any) -> NodeRegistry:
    registry = NodeRegistry()
    load_custom_nodes(registry, [folder], **kwargs)
    return registry


def run(registry: NodeRegistry, api: dict[str, Any], executor: Executor | None = None,
        tmp_path: Path | None = None) -> tuple[ExecutionResult, RecordingListener]:
    if executor is None:
        executor = Executor(registry, Services(Paths.from_base(tmp_path or Path.cwd())))
    checked = validate_prompt(api, registry, executor.services)
    assert checked.ok, checked.to_json()
    listener = RecordingListener()
    result = executor.execute(checked.prompt, checked.outputs, listener=listener)
    assert result.ok, result.error
    return result, listener


def validated(registry: NodeRegistry, api: dict[str, Any], tmp_path: Path) -> ValidationResult:
    return validate_prompt(api, registry, Services(Paths.from_base(tmp_path)))


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


# -- loading ---------------------------------------------------------------------------------

def test_single_file_pack_loads_and_runs(tmp_path: Path) -> None:
    pack(tmp_path / "custom_nodes", "adder", '''
        class Add:
            @classmethod
            def INPUT_TYPES(cls):
                return {"required": {"a": ("INT",), "b": ("INT", {"default": 1})}}
            RETURN_TYPES = ("INT",)
            FUNCTION = "add"
            def add(self, a, b):
                return (a + b,)
        ''', '"Const": Const, "Add": Add, "Show": Show')
    registry = loaded(tmp_path / "custom_nodes")
    assert registry.loaded_packs == ["adder"] and registry.pack_errors == []
    result, _ = run(registry, {"1": node("Const", value=40), "2": node("Add", a=["1", 0], b=2),
                               "3": node("Show", value=["2", 0])}, tmp_path=tmp_path)
    assert result.outputs["3"] == {"value": [42]}
    assert registry.object_info_for("Add")["python_module"] == "custom_nodes.adder"


def test_package_pack_imports_its_own_modules_relatively(tmp_path: Path) -> None:
    package = tmp_path / "custom_nodes" / "shouty"
    write(package / "helpers.py", "def shout(text):\n    return text.upper() + '!'\n")
    write(package / "nodes.py", '''
        from .helpers import shout
        class Shout:
            @classmethod
            def INPUT_TYPES(cls):
                return {"required": {"text": ("STRING", {"default": "hi"})}}
            RETURN_TYPES = ("STRING",)
            FUNCTION = "run"
            OUTPUT_NODE = True
            def run(self, text):
                return {"ui": {"text": [shout(text)]}, "result": (shout(text),)}
        ''')
    write(package / "__init__.py", '''
        from .nodes import Shout
        NODE_CLASS_MAPPINGS = {"Shout": Shout}
        NODE_DISPLAY_NAME_MAPPINGS = {"Shout": "Shout It"}
        ''')
    registry = loaded(tmp_path / "custom_nodes")
    assert registry.object_info_for("Shout")["display_name"] == "Shout It"
    result, _ = run(registry, {"1": node("Shout", text="hello")}, tmp_path=tmp_path)
    assert result.outputs["1"] == {"text": ["HELLO!"]}


def test_broken_pack_is_reported_with_its_traceback_and_others_load(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "custom_nodes"
    write(folder / "broken.py", "raise ImportError('needs the missing_dependency package')\n")
    pack(folder, "working", "", '"Const": Const')
    with caplog.at_level(logging.INFO, logger="loom.custom_nodes"):
        registry = loaded(folder)
    assert registry.loaded_packs == ["working"] and "Const" in registry
    [error] = registry.pack_errors
    assert error.name == "broken" and error.path == folder / "broken.py"
    assert "ImportError: needs the missing_dependency package" in error.traceback
    assert str(folder / "broken.py") in error.traceback
    assert "needs the missing_dependency package" in caplog.text
    assert "(IMPORT FAILED)" in caplog.text and "Import times for custom nodes:" in caplog.text


def test_disabled_entries_are_skipped_and_disable_all_keeps_only_the_whitelist(
        tmp_path: Path) -> None:
    folder = tmp_path / "custom_nodes"
    pack(folder, "first", "", '"Const": Const')
    pack(folder, "second", "", '"Show": Show')
    write(folder / "third.py.disabled", "raise RuntimeError('must not be imported')\n")
    write(folder / "__pycache__" / "junk.py", "raise RuntimeError('must not be imported')\n")
    assert loaded(folder).loaded_packs == ["first", "second"]
    only = loaded(folder, disable_all=True, whitelist=["second.py"])
    assert only.loaded_packs == ["second"] and list(only) == ["Show"]
    assert loaded(folder, disable_all=True).loaded_packs == []


def test_web_directory_is_recorded_as_an_absolute_path(tmp_path: Path) -> None:
    package = tmp_path / "custom_nodes" / "webby"
    (package / "js").mkdir(parents=True)
    write(package / "__init__.py", "NODE_CLASS_MAPPINGS = {}\nWEB_DIRECTORY = './js'\n")
    registry = loaded(tmp_path / "custom_nodes")
    assert registry.web_directories == {"webby": (package / "js").resolve()}


def test_a_name_clash_keeps_the_first_registration(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class BuiltinShow(Node):
        schema = NodeSchema("Show", inputs=(Link("value", "*"),), output_node=True)

    registry = NodeRegistry()
    registry.register(BuiltinShow)
    pack(tmp_path / "custom_nodes", "clashing", "", '"Show": Show, "Const": Const')
    with caplog.at_level(logging.WARNING, logger="loom.custom_nodes"):
        load_custom_nodes(registry, [tmp_path / "custom_nodes"])
    assert registry.get("Show") is BuiltinShow and "Const" in registry
    assert "Show" in caplog.text and "already registered" in caplog.text


def test_a_class_whose_input_types_raises_is_a_pack_error(tmp_path: Path) -> None:
    pack(tmp_path / "custom_nodes", "halfway", '''
        class Fragile:
            @classmethod
            def INPUT_TYPES(cls):
                raise RuntimeError("cannot list the model folder")
            RETURN_TYPES = ()
            FUNCTION = "run"
            def run(self):
                return ()
        ''', '"Fragile": Fragile, "Const": Const')
    registry = loaded(tmp_path / "custom_nodes")
    assert "Const" in registry and "Fragile" not in registry
    [error] = registry.pack_errors
    assert "'Fragile'" in error.traceback and "cannot list the model folder" in error.traceback


def test_the_repository_example_pack_loads_and_runs(tmp_path: Path) -> None:
    registry = loaded(REPO_CUSTOM_NODES, disable_all=True, whitelist=["example_pack"])
    assert registry.loaded_packs == ["example_pack"] and registry.pack_errors == []
    api = {"1": node("LoomExampleTextConcat", text_a="red", text_b="blue", separator="comma"),
           "2": node("LoomExampleShowText", text=["1", 0])}
    result, _ = run(registry, api, tmp_path=tmp_path)
    assert result.outputs["2"] == {"text": ["red, blue"]}


# -- schema ----------------------------------------------------------------------------------

class Everything:
    """A classic class using every kind of input declaration."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**64 - 1, "step": 1,
                                 "control_after_generate": True}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.01,
                                       "round": 0.001, "tooltip": "How strong."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True}),
                "enabled": ("BOOLEAN", {"default": True, "label_on": "on"}),
                "mode": (["fast", "slow"], {"default": "slow", "tooltip": "Speed."}),
                "method": ("COMBO", {"options": ["a", "b"], "default": "a",
                                     "multiselect": False}),
                "image": ("IMAGE", {"lazy": True}),
                "latent": ("LATENT",),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Where to apply."}),
                "anything": ("*", {"forceInput": True, "rawLink": True}),
            },
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID",
                       "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ("IMAGE", ["x", "y"], "INT")
    RETURN_NAMES = ("image", "choice")
    OUTPUT_IS_LIST = (False, False, True)
    OUTPUT_TOOLTIPS = ("The result.", "", "Counts.")
    FUNCTION = "run"
    CATEGORY = "testing/classic"
    DESCRIPTION = "Uses everything."
    OUTPUT_NODE = True
    DEPRECATED = True

    def run(self, **inputs: Any) -> tuple[Any, ...]:
        return (None, "x", [])


def as_object_info(input_types: dict[str, Any]) -> dict[str, Any]:
    """INPUT_TYPES as /object_info writes it: lists for tuples, an options dict always."""
    visible = {section: {name: [spec[0], spec[1] if len(spec) > 1 else {}]
                         for name, spec in input_types[section].items()}
               for section in ("required", "optional")}
    return json.loads(json.dumps({**visible, "hidden": input_types["hidden"]}))


def test_classic_schema_round_trips_through_object_info() -> None:
    adapted = adapt_classic("Everything", Everything, "Every Thing", "custom_nodes.pack")
    entry = object_info_entry(adapted.schema)
    assert json.loads(json.dumps(entry["input"])) == as_object_info(Everything.INPUT_TYPES())
    assert entry["input_order"]["required"] == list(Everything.INPUT_TYPES()["required"])
    assert entry["output"] == ["IMAGE", "COMBO", "INT"]
    assert entry["output_name"] == ["image", "choice", "INT"]
    assert entry["output_is_list"] == [False, False, True]
    assert entry["output_tooltips"] == ["The result.", "", "Counts."]
    assert (entry["display_name"], entry["category"], entry["description"]) == (
        "Every Thing", "testing/classic", "Uses everything.")
    assert entry["output_node"] and entry["deprecated"] and "experimental" not in entry
    assert adapted.schema.lazy_inputs == {"image"}


def test_declaration_mistakes_are_named() -> None:
    class OneString:
        @classmethod
        def INPUT_TYPES(cls) -> dict[str, Any]:
            return {"required": {}}
        RETURN_TYPES = "IMAGE"
        FUNCTION = "run"

        def run(self) -> tuple[Any, ...]:
            return ()

    with pytest.raises(ValueError, match=r"RETURN_TYPES is 'IMAGE'.*\('IMAGE',\)"):
        adapt_classic("OneString", OneString, None, "m")
    OneString.RETURN_TYPES = ("IMAGE",)
    OneString.FUNCTION = "missing"
    adapted = adapt_classic("OneString", OneString, None, "m")  # registers, as ComfyUI does
    with pytest.raises(ValueError, match="FUNCTION is 'missing'"):
        adapted().execute(None)  # type: ignore[arg-type]


# -- running ---------------------------------------------------------------------------------

def test_output_node_returns_ui_and_result_and_hidden_inputs_arrive_by_name(
        tmp_path: Path) -> None:
    pack(tmp_path / "custom_nodes", "reporting", '''
        class Report:
            @classmethod
            def INPUT_TYPES(cls):
                return {"required": {"value": ("INT",)},
                        "hidden": {"me": "UNIQUE_ID", "graph": "PROMPT"}}
            RETURN_TYPES = ("INT",)
            FUNCTION = "run"
            OUTPUT_NODE = True
            def run(self, value, me, graph):
                seen = f"{me}:{graph[me]['class_type']}"
                return {"ui": {"seen": [seen]}, "result": (value * 2,)}
        ''', '"Const": Const, "Report": Report, "Show": Show')
    registry = loaded(tmp_path / "custom_nodes")
    result, _ = run(registry, {"1": node("Const", value=5), "2": node("Report", value=["1", 0]),
                               "3": node("Show", value=["2", 0])}, tmp_path=tmp_path)
    assert result.outputs == {"2": {"seen": ["2:Report"]}, "3": {"value": [10]}}


LISTS = '''
class Produce:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"count": ("INT", {"default": 3})}}
    RETURN_TYPES = ("INT",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "run"
    def run(self, count):
        return (list(range(1, count + 1)),)

class Double:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT",)}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    def run(self, value):
        return {"ui": {"calls": [value]}, "result": (value * 2,)}

class Collect:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"values": ("INT",), "label": ("STRING", {"default": ""})}}
    RETURN_TYPES = ()
    INPUT_IS_LIST = True
    FUNCTION = "run"
    OUTPUT_NODE = True
    def run(self, values, label):
        return {"ui": {"received": [values], "label": label}}
'''


def test_a_list_output_runs_a_plain_node_per_item_and_a_list_input_node_once(
        tmp_path: Path) -> None:
    pack(tmp_path / "custom_nodes", "lists", LISTS,
         '"Produce": Produce, "Double": Double, "Collect": Collect')
    registry = loaded(tmp_path / "custom_nodes")
    api = {"1": node("Produce", count=3), "2": node("Double", value=["1", 0]),
           "3": node("Collect", values=["2", 0], label="x")}
    result, _ = run(registry, api, tmp_path=tmp_path)
    assert result.outputs["2"] == {"calls": [1, 2, 3]}
    assert result.outputs["3"] == {"received": [[2, 4, 6]], "label": ["x"]}


CACHING = '''
class Volatile:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT",)}}
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    @classmethod
    def IS_CHANGED(cls, value):
        return float("nan")
    def run(self, value):
        return {"ui": {"value": [value]}}

class Steady(Volatile):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT",), "path": ("STRING", {"default": "a.txt"})}}
    @classmethod
    def IS_CHANGED(cls, path):
        return "same content hash for " + path
    def run(self, value, path):
        return {"ui": {"value": [value]}}

class Unique(Volatile):
    NOT_IDEMPOTENT = True
    IS_CHANGED = None
'''


def test_is_changed_nan_reruns_while_a_steady_answer_stays_cached(tmp_path: Path) -> None:
    pack(tmp_path / "custom_nodes", "caching", CACHING, '"Volatile": Volatile, "Steady": Steady')
    registry = loaded(tmp_path / "custom_nodes")
    executor = Executor(registry, Services(Paths.from_base(tmp_path)))
    api = {"1": node("Volatile", value=1), "2": node("Steady", value=1, path="a.txt")}
    _, first = run(registry, api, executor)
    _, second = run(registry, api, executor)
    assert sorted(first.executed_nodes()) == ["1", "2"]
    assert second.executed_nodes() == ["1"]


def test_not_idempotent_nodes_are_never_shared_or_reused(tmp_path: Path) -> None:
    pack(tmp_path / "custom_nodes", "caching", CACHING, '"Unique": Unique')
    registry = loaded(tmp_path / "custom_nodes")
    assert registry.get("Unique").schema.idempotent is False
    executor = Executor(registry, Services(Paths.from_base(tmp_path)))
    api = {"1": node("Unique", value=1), "2": node("Unique", value=1)}
    _, first = run(registry, api, executor)
    _, second = run(registry, api, executor)
    assert sorted(first.executed_nodes()) == sorted(second.executed_nodes()) == ["1", "2"]


VALIDATING = '''
class Even:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"amount": ("INT", {"default": 0, "max": 10}),
                             "other": ("INT", {"default": 0, "max": 10})}}
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    @classmethod
    def VALIDATE_INPUTS(cls, amount, input_types):
        if input_types != {}:
            return f"unexpected input_types {input_types!r}"
        return True if amount % 2 == 0 else f"amount {amount} is odd; use an even number"
    def run(self, amount, other):
        return {"ui": {"amount": [amount]}}
'''


def test_validate_inputs_error_is_a_custom_validation_failure(tmp_path: Path) -> None:
    pack(tmp_path / "custom_nodes", "validating", VALIDATING, '"Even": Even')
    registry = loaded(tmp_path / "custom_nodes")
    checked = validated(registry, {"1": node("Even", amount=13, other=1)}, tmp_path)
    [error] = checked.node_errors["1"]["errors"]
    assert error["type"] == "custom_validation_failed"
    assert "amount 13 is odd" in error["details"]


def test_inputs_named_by_validate_inputs_skip_the_range_checks(tmp_path: Path) -> None:
    pack(tmp_path / "custom_nodes", "validating", VALIDATING, '"Even": Even')
    registry = loaded(tmp_path / "custom_nodes")
    result, _ = run(registry, {"1": node("Even", amount=12, other=1)}, tmp_path=tmp_path)
    assert result.outputs["1"] == {"amount": [12]}
    checked = validated(registry, {"1": node("Even", amount=12, other=11)}, tmp_path)
    assert [e["type"] for e in checked.node_errors["1"]["errors"]] == ["value_bigger_than_max"]


def test_an_any_type_equal_to_every_name_is_an_input_of_any_type(tmp_path: Path) -> None:
    pack(tmp_path / "custom_nodes", "anytype", '''
        class AlwaysEqual(str):
            def __eq__(self, other):
                return True
            def __ne__(self, other):
                return False
            __hash__ = str.__hash__
        class Anything:
            @classmethod
            def INPUT_TYPES(cls):
                return {"required": {"value": (AlwaysEqual("*"),)}}
            RETURN_TYPES = ("INT",)
            FUNCTION = "run"
            def run(self, value):
                return (value,)
        ''', '"Anything": Anything')
    schema = loaded(tmp_path / "custom_nodes").get("Anything").schema
    assert schema.inputs[0].type == "*" and type(schema.inputs[0].type) is str


def test_a_lazy_switch_evaluates_only_the_branch_it_needs(tmp_path: Path) -> None:
    pack(tmp_path / "custom_nodes", "switching", '''
        class Switch:
            @classmethod
            def INPUT_TYPES(cls):
                return {"required": {"use_first": ("BOOLEAN", {"default": True}),
                                     "first": ("INT", {"lazy": True}),
                                     "second": ("INT", {"lazy": True})}}
            RETURN_TYPES = ("INT",)
            FUNCTION = "run"
            def check_lazy_status(self, use_first, first=None, second=None):
                wanted = "first" if use_first else "second"
                return [wanted] if locals()[wanted] is None else []
            def run(self, use_first, first=None, second=None):
                return (first if use_first else second,)
        ''', '"Const": Const, "Show": Show, "Switch": Switch')
    registry = loaded(tmp_path / "custom_nodes")
    api = {"1": node("Const", value=1), "2": node("Const", value=2),
           "3": node("Switch", use_first=False, first=["1", 0], second=["2", 0]),
           "4": node("Show", value=["3", 0])}
    result, listener = run(registry, api, tmp_path=tmp_path)
    assert result.outputs["4"] == {"value": [2]}
    assert "1" not in listener.executed_nodes() and "2" in listener.executed_nodes()


def test_an_empty_expansion_gives_the_literal_results(tmp_path: Path) -> None:
    pack(tmp_path / "custom_nodes", "expanding", '''
        class Expand:
            @classmethod
            def INPUT_TYPES(cls):
                return {"required": {}}
            RETURN_TYPES = ("INT",)
            FUNCTION = "run"
            OUTPUT_NODE = True
            def run(self):
                return {"result": (1,), "expand": {}}
        ''', '"Expand": Expand')
    registry = loaded(tmp_path / "custom_nodes")
    checked = validated(registry, {"1": node("Expand")}, tmp_path)
    result = Executor(registry, Services(Paths.from_base(tmp_path))).execute(
        checked.prompt, checked.outputs)
    assert result.ok and result.values["1"] == [[1]]


def test_a_loom_node_and_a_classic_node_link_together(tmp_path: Path) -> None:
    class Greeting(Node):
        schema = NodeSchema("Greeting", inputs=(String("name", default="you"),),
                            outputs=(Output("STRING"),))

        def execute(self, ctx: Any, **inputs: Any) -> tuple[Any, ...]:
            return (f"hello {inputs['name']}",)

    registry = NodeRegistry()
    registry.register(Greeting)
    pack(tmp_path / "custom_nodes", "mixed", "", '"Show": Show')
    load_custom_nodes(registry, [tmp_path / "custom_nodes"])
    api = {"1": node("Greeting", name="Ada"), "2": node("Show", value=["1", 0])}
    result, _ = run(registry, api, tmp_path=tmp_path)
    assert result.outputs["2"] == {"value": ["hello Ada"]}


def test_plain_method_hooks_are_called_on_an_instance(tmp_path: Path) -> None:
    class OldStyle:
        def INPUT_TYPES(s: Any) -> dict[str, Any]:  # no @classmethod, as in some old packs
            return {"required": {"value": ("INT", {"max": 5})}}

        RETURN_TYPES = ()
        FUNCTION = "run"
        OUTPUT_NODE = True

        def IS_CHANGED(self, **inputs: Any) -> Any:
            return inputs["value"]

        def VALIDATE_INPUTS(self, **inputs: Any) -> bool:
            return True

        def run(self, value: int) -> dict[str, Any]:
            return {"ui": {"value": [value]}}

    registry = NodeRegistry()
    registry.register(adapt_classic("OldStyle", OldStyle, None, "custom_nodes.old"))
    assert registry.get("OldStyle").self_validated_inputs() == {"value"}
    result, _ = run(registry, {"1": node("OldStyle", value=9)}, tmp_path=tmp_path)
    assert result.outputs["1"] == {"value": [9]}


def test_extra_returned_values_are_ignored_and_missing_ones_are_none() -> None:
    class Uneven:
        @classmethod
        def INPUT_TYPES(cls) -> dict[str, Any]:
            return {"required": {}}
        RETURN_TYPES = ("INT", "INT")
        FUNCTION = "run"

        def run(self) -> tuple[Any, ...]:
            return (1, 2, 3)

    adapted = adapt_classic("Uneven", Uneven, None, "m")
    assert adapted().execute(None).outputs == (1, 2)  # type: ignore[arg-type]
    Uneven.run = lambda self: (1,)  # type: ignore[method-assign]
    assert adapted().execute(None).outputs == (1, None)  # type: ignore[arg-type]


def test_a_hidden_input_of_a_packs_own_kind_is_not_passed_when_unset() -> None:
    class Versioned:
        @classmethod
        def INPUT_TYPES(cls) -> dict[str, Any]:
            return {"required": {"value": ("INT", {"default": 1})},
                    "hidden": {"version": ("1.2",), "unique_id": "UNIQUE_ID"}}
        RETURN_TYPES = ("INT",)
        FUNCTION = "run"

        def run(self, value: int, unique_id: str | None = None) -> tuple[Any, ...]:
            return (value,)

    adapted = adapt_classic("Versioned", Versioned, None, "m")
    result = adapted().execute(None, value=4, version=None, unique_id="9")  # type: ignore[arg-type]
    assert result.outputs == (4,)
