"""Typed node declarations: a node states its inputs and outputs once, and everything else
(the ComfyUI `/object_info` schema, validation, widget order) is derived from that."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from engine.context import NodeContext


class _Missing:
    """Marker for 'no default declared' (None is a legitimate default)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()

# Hidden inputs the engine fills in itself; value = keyword the node receives by default.
HIDDEN_KINDS = ("PROMPT", "EXTRA_PNGINFO", "UNIQUE_ID", "DYNPROMPT", "AUTH_TOKEN_COMFY_ORG",
                "API_KEY_COMFY_ORG")
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
ANY_TYPE = "*"


class ChoiceSource:
    """Combo choices computed when asked (e.g. the files in a model folder)."""

    def resolve(self, env: Any) -> list[str]:
        raise NotImplementedError

    def placeholder(self) -> str:
        """How the choices are described where they cannot be listed (docs, tests)."""
        return f"<{type(self).__name__}>"


@dataclass(frozen=True)
class FilesIn(ChoiceSource):
    """The files found in a model/input folder kind, as names relative to that folder."""

    folder: str

    def resolve(self, env: Any) -> list[str]:
        if env is None or getattr(env, "paths", None) is None:
            return []
        return env.paths.list_files(self.folder)

    def placeholder(self) -> str:
        return f"<files in {self.folder}>"


@dataclass(frozen=True)
class Input:
    """One declared input. `type` is the IO type name ("INT", "MODEL", "COMBO", "*", ...)."""

    name: str
    type: str
    default: Any = MISSING
    min: float | None = None
    max: float | None = None
    step: float | None = None
    round: float | bool | None = None
    choices: tuple[str, ...] | ChoiceSource | None = None
    optional: bool = False
    hidden: bool = False
    tooltip: str | None = None
    lazy: bool = False
    # Editor hints passed through to the schema verbatim (multiline, dynamicPrompts,
    # control_after_generate, image_upload, display, advanced, forceInput, ...).
    options: Mapping[str, Any] = field(default_factory=dict)
    # "legacy" combos serialise as [[choices], {...}]; "v3" as ["COMBO", {"multiselect": false,
    # "options": [...]}]; "typed" (classic nodes that declare "COMBO") as ["COMBO", {"options"}].
    combo_style: str = "legacy"
    # A V3 dynamic input (engine.dynamic_inputs): the concrete inputs it stands for.
    dynamic: Any = None

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)

    @property
    def is_seed(self) -> bool:
        """Seed widgets carry an extra control value (fixed/randomize...) in editor files."""
        return bool(self.options.get("control_after_generate"))

    def resolved_choices(self, env: Any = None) -> list[str] | None:
        if self.choices is None:
            return None
        if isinstance(self.choices, ChoiceSource):
            return self.choices.resolve(env)
        return list(self.choices)


@dataclass(frozen=True)
class Output:
    """One declared output; `name` defaults to the type name."""

    type: str
    name: str | None = None
    is_list: bool = False
    tooltip: str | None = None
    # The MatchType template whose type this output takes (ComfyUI's output_matchtypes).
    match_template: str | None = None

    @property
    def display_name(self) -> str:
        return self.name if self.name is not None else self.type


def Int(name: str, default: int = 0, min: int | None = None, max: int | None = None,
        step: int | None = None, **kw: Any) -> Input:
    """An INT widget."""
    return Input(name, "INT", default=default, min=min, max=max, step=step, **kw)


def Float(name: str, default: float = 0.0, min: float | None = None, max: float | None = None,
          step: float | None = None, round: float | bool | None = None, **kw: Any) -> Input:
    """A FLOAT widget."""
    return Input(name, "FLOAT", default=default, min=min, max=max, step=step, round=round, **kw)


def String(name: str, default: Any = MISSING, multiline: bool = False, **kw: Any) -> Input:
    """A STRING widget (`multiline` gives the editor's text box)."""
    options = dict(kw.pop("options", {}))
    if multiline:
        options["multiline"] = True
    return Input(name, "STRING", default=default, options=options, **kw)


def Boolean(name: str, default: bool = False, **kw: Any) -> Input:
    """A BOOLEAN toggle."""
    return Input(name, "BOOLEAN", default=default, **kw)


def Combo(name: str, choices: Sequence[str] | ChoiceSource, default: Any = MISSING,
          **kw: Any) -> Input:
    """A combo (drop-down) over fixed or computed choices."""
    fixed = choices if isinstance(choices, ChoiceSource) else tuple(choices)
    return Input(name, "COMBO", default=default, choices=fixed, **kw)


def Link(name: str, type: str, **kw: Any) -> Input:
    """An input fed only by another node's output (MODEL, LATENT, IMAGE, ...).

    For INT/FLOAT/STRING/BOOLEAN this sets forceInput: a socket in the editor, not a widget."""
    if type in WIDGET_TYPES:
        kw["options"] = {"forceInput": True, **kw.get("options", {})}
    return Input(name, type, **kw)


def Hidden(name: str, kind: str) -> Input:
    """A value the engine supplies (PROMPT, EXTRA_PNGINFO, UNIQUE_ID, ...)."""
    if kind not in HIDDEN_KINDS:
        raise ValueError(f"hidden input {name!r}: unknown kind {kind!r}; use one of {HIDDEN_KINDS}")
    return Input(name, kind, hidden=True)


@dataclass(frozen=True)
class NodeSchema:
    """Everything a node type declares about itself."""

    name: str
    inputs: tuple[Input, ...] = ()
    outputs: tuple[Output, ...] = ()
    category: str = ""
    display_name: str | None = None
    description: str = ""
    output_node: bool = False
    version: str = "1"
    idempotent: bool = True
    input_is_list: bool = False
    deprecated: bool = False
    experimental: bool = False
    python_module: str = "nodes"
    # Declared with ComfyUI's V3 schema: /object_info then lists hidden inputs as [kind] and
    # always carries deprecated, experimental, output_matchtypes and output_tooltips.
    comfy_v3: bool = False
    lazy_inputs: frozenset[str] = field(init=False, repr=False, compare=False)
    hidden_inputs: tuple[Input, ...] = field(init=False, repr=False, compare=False)
    _by_name: dict[str, Input] = field(init=False, repr=False, compare=False)
    has_dynamic: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [i.name for i in self.inputs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"node {self.name!r} declares input(s) {dupes} more than once")
        # Derived lookups, computed once: the executor consults them for every node it runs.
        by_name = {i.name: i for i in self.inputs}
        for spec in self.inputs:
            if spec.dynamic is not None:
                by_name.update({member.name: member for member in spec.dynamic.members(spec)})
        object.__setattr__(self, "_by_name", by_name)
        object.__setattr__(self, "has_dynamic", any(i.dynamic is not None for i in self.inputs))
        object.__setattr__(self, "lazy_inputs", frozenset(i.name for i in self.inputs if i.lazy))
        object.__setattr__(self, "hidden_inputs", tuple(i for i in self.inputs if i.hidden))

    def input(self, name: str) -> Input | None:
        return self._by_name.get(name)

    def declares(self, name: str) -> bool:
        return name in self._by_name

    def concrete_inputs(self, literals: Mapping[str, Any]) -> tuple[Input, ...]:
        """The inputs a prompt node has to satisfy: dynamic inputs replaced by the members
        that the prompt's own values call for (a DynamicCombo's chosen option)."""
        if not self.has_dynamic:
            return self.inputs
        concrete: list[Input] = []
        for spec in self.inputs:
            if spec.dynamic is None:
                concrete.append(spec)
            else:
                concrete.extend(spec.dynamic.present_members(spec, literals))
        return tuple(concrete)

    @property
    def visible_inputs(self) -> tuple[Input, ...]:
        return tuple(i for i in self.inputs if not i.hidden)


@dataclass
class NodeResult:
    """What `execute` returns: output values (one per declared output) and the editor UI dict.

    `expand`, when set, is a graph of new nodes (API format, ids unique in the prompt) the
    engine adds to the running prompt and runs; outputs given as ExpansionLink then take the
    values of those nodes' outputs (engine/expansion.py)."""

    outputs: tuple[Any, ...] = ()
    ui: dict[str, Any] | None = None
    expand: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ExpansionLink:
    """An output of an expanding node that is the output `slot` of node `node_id` of its
    expansion (ComfyUI's `[node_id, slot]` in the `result` of an `expand` return)."""

    node_id: str
    slot: int


class Node:
    """Base of every node type. Subclasses set `schema` and implement `execute`.

    Instances must not keep results between calls (the engine's cache does that)."""

    schema: ClassVar[NodeSchema]
    # True when `validate` checks the types of linked inputs itself (ComfyUI: VALIDATE_INPUTS
    # taking `input_types`); validation then accepts any link type for this node.
    validates_link_types: ClassVar[bool] = False
    # Stateless nodes share one instance per type; a type that keeps state between calls of
    # the same prompt node (classic custom nodes do) gets one instance per node id.
    per_node_instance: ClassVar[bool] = False

    def execute(self, ctx: NodeContext, **inputs: Any) -> NodeResult | tuple[Any, ...]:
        raise NotImplementedError

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        """A value that changes when the node's external state does (file hash, mtime).

        Mixed into the cache key; return ALWAYS_CHANGED to run on every prompt."""
        return None

    def validate(self, ctx: NodeContext, **inputs: Any) -> str | tuple[str, str] | None:
        """Extra checks on the literal inputs; an error message, (input name, message) or None.

        Runs at validation time, before anything executes (ComfyUI's VALIDATE_INPUTS)."""
        return None

    @classmethod
    def self_validated_inputs(cls) -> frozenset[str]:
        """Inputs whose type/range checks `validate` does itself (built-in checks skipped)."""
        return frozenset()

    def check_lazy(self, ctx: NodeContext, **inputs: Any) -> list[str]:
        """Names of lazy inputs still needed, given those evaluated so far (others None)."""
        return []


class _AlwaysChanged:
    """Fingerprint meaning 'never reuse a cached result' (ComfyUI's IS_CHANGED -> NaN)."""

    def __repr__(self) -> str:
        return "ALWAYS_CHANGED"


ALWAYS_CHANGED: Any = _AlwaysChanged()

NodeFactory = Callable[[], Node]
