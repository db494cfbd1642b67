"""ComfyUI's V3 node declarations (`comfy_api.latest.io`): a ComfyNode declares a Schema of
typed inputs and outputs once and implements `execute` as a classmethod. `__loom_node__` turns
such a class into a Loom node type (engine/custom_nodes.py registers it), so V3 nodes validate,
cache and run like Loom's own."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine.node import Input as LoomInput
from engine.node import Output as LoomOutput


class FolderType(str, enum.Enum):
    input = "input"
    output = "output"
    temp = "temp"


class UploadType(str, enum.Enum):
    image = "image_upload"
    audio = "audio_upload"
    video = "video_upload"
    model = "file_upload"


class NumberDisplay(str, enum.Enum):
    number = "number"
    slider = "slider"


class Hidden(str, enum.Enum):
    """Values the engine supplies to a node (read in execute as cls.hidden.<name>)."""

    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"
    auth_token_comfy_org = "AUTH_TOKEN_COMFY_ORG"
    api_key_comfy_org = "API_KEY_COMFY_ORG"


class HiddenHolder:
    """`cls.hidden` inside execute: each Hidden value of this run (None when not declared)."""

    def __init__(self, values: dict[str, Any]) -> None:
        for member in Hidden:
            setattr(self, member.name, values.get(member.name))


@dataclass
class InputSpec:
    """One declared input of a V3 schema."""

    io_type: str
    id: str
    display_name: str | None = None
    optional: bool = False
    tooltip: str | None = None
    lazy: bool | None = None
    default: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    choices: list[Any] | None = None

    def loom_input(self) -> LoomInput:
        from engine.node import MISSING
        extra = {k: v for k, v in self.options.items() if v is not None}
        numeric = {k: extra.pop(k) for k in ("min", "max", "step", "round") if k in extra}
        if self.display_name:
            extra["display_name"] = self.display_name
        default = MISSING if self.default is None else self.default
        if self.choices is not None:
            return LoomInput(self.id, "COMBO", default=default, choices=tuple(self.choices),
                             optional=self.optional, tooltip=self.tooltip,
                             lazy=bool(self.lazy), options=extra, combo_style="v3")
        return LoomInput(self.id, self.io_type, default=default, optional=self.optional,
                         tooltip=self.tooltip, lazy=bool(self.lazy), options=extra, **numeric)


@dataclass
class OutputSpec:
    """One declared output of a V3 schema."""

    io_type: str
    id: str | None = None
    display_name: str | None = None
    tooltip: str | None = None
    is_output_list: bool = False

    def loom_output(self) -> LoomOutput:
        return LoomOutput(self.io_type, name=self.display_name or self.id,
                          is_list=self.is_output_list, tooltip=self.tooltip)


class ComfyType:
    """A V3 IO type: `io.<Type>.Input(...)` and `io.<Type>.Output(...)` declare sockets."""

    io_type: ClassVar[str] = "*"

    @classmethod
    def Input(cls, id: str, display_name: str | None = None, optional: bool = False,  # noqa: N802
              tooltip: str | None = None, lazy: bool | None = None, default: Any = None,
              **options: Any) -> InputSpec:
        options.pop("extra_dict", None)
        if options.pop("force_input", None) or options.pop("socketless", None) is False:
            options["forceInput"] = True
        return InputSpec(cls.io_type, id, display_name, optional, tooltip, lazy, default,
                         _editor_options(options))

    @classmethod
    def Output(cls, id: str | None = None, display_name: str | None = None,  # noqa: N802
               tooltip: str | None = None, is_output_list: bool = False) -> OutputSpec:
        return OutputSpec(cls.io_type, id, display_name, tooltip, is_output_list)


def _editor_options(options: dict[str, Any]) -> dict[str, Any]:
    """V3 keyword names -> the /object_info option names the editor reads."""
    renames = {"display_mode": "display", "dynamic_prompts": "dynamicPrompts",
               "label_on": "label_on", "label_off": "label_off"}
    out = {}
    for key, value in options.items():
        if value is None:
            continue
        if key == "control_after_generate" and value is True:
            value = True
        out[renames.get(key, key)] = value.value if isinstance(value, enum.Enum) else value
    return out


def Custom(io_type: str) -> type[ComfyType]:  # noqa: N802 - ComfyUI's factory name
    """A type a pack defines by name (e.g. io.Custom("BBOX"))."""
    return type(f"Custom_{io_type}", (ComfyType,), {"io_type": io_type})


def _type(name: str, io_type: str) -> type[ComfyType]:
    return type(name, (ComfyType,), {"io_type": io_type})


Int = _type("Int", "INT")
Float = _type("Float", "FLOAT")
String = _type("String", "STRING")
Boolean = _type("Boolean", "BOOLEAN")
Image = _type("Image", "IMAGE")
Mask = _type("Mask", "MASK")
Latent = _type("Latent", "LATENT")
Conditioning = _type("Conditioning", "CONDITIONING")
Model = _type("Model", "MODEL")
Clip = _type("Clip", "CLIP")
Vae = _type("Vae", "VAE")
ControlNet = _type("ControlNet", "CONTROL_NET")
ClipVision = _type("ClipVision", "CLIP_VISION")
ClipVisionOutput = _type("ClipVisionOutput", "CLIP_VISION_OUTPUT")
StyleModel = _type("StyleModel", "STYLE_MODEL")
Gligen = _type("Gligen", "GLIGEN")
UpscaleModel = _type("UpscaleModel", "UPSCALE_MODEL")
Sigmas = _type("Sigmas", "SIGMAS")
Noise = _type("Noise", "NOISE")
Sampler = _type("Sampler", "SAMPLER")
Guider = _type("Guider", "GUIDER")
Audio = _type("Audio", "AUDIO")
Video = _type("Video", "VIDEO")
Webcam = _type("Webcam", "WEBCAM")
Photomaker = _type("Photomaker", "PHOTOMAKER")
Hooks = _type("Hooks", "HOOKS")
LatentOperation = _type("LatentOperation", "LATENT_OPERATION")
AnyType = _type("AnyType", "*")
# types only packs and non-SD families produce; Loom passes their values through unchanged
WanCameraEmbedding = _type("WanCameraEmbedding", "WAN_CAMERA_EMBEDDING")
LatentUpscaleModel = _type("LatentUpscaleModel", "LATENT_UPSCALE_MODEL")
SVG = _type("SVG", "SVG")
LoraModel = _type("LoraModel", "LORA_MODEL")
LossMap = _type("LossMap", "LOSS_MAP")
Voxel = _type("Voxel", "VOXEL")
Mesh = _type("Mesh", "MESH")
HookKeyframes = _type("HookKeyframes", "HOOK_KEYFRAMES")
TimestepsRange = _type("TimestepsRange", "TIMESTEPS_RANGE")
FlowControl = _type("FlowControl", "FLOW_CONTROL")
Accumulation = _type("Accumulation", "ACCUMULATION")
Load3DCamera = _type("Load3DCamera", "LOAD3D_CAMERA")
Load3D = _type("Load3D", "LOAD_3D")
Load3DAnimation = _type("Load3DAnimation", "LOAD_3D_ANIMATION")
Point = _type("Point", "POINT")
FaceAnalysis = _type("FaceAnalysis", "FACE_ANALYSIS")
BBOX = _type("BBOX", "BBOX")
SEGS = _type("SEGS", "SEGS")
MODEL_PATCH = _type("MODEL_PATCH", "MODEL_PATCH")
AudioEncoder = _type("AudioEncoder", "AUDIO_ENCODER")
AudioEncoderOutput = _type("AudioEncoderOutput", "AUDIO_ENCODER_OUTPUT")
Tracks = _type("Tracks", "TRACKS")


class Combo(ComfyType):
    io_type = "COMBO"

    @classmethod
    def Input(cls, id: str, options: Any = None, display_name: str | None = None,  # noqa: N802
              optional: bool = False, tooltip: str | None = None, lazy: bool | None = None,
              default: Any = None, **extra: Any) -> InputSpec:
        choices = [o.value if isinstance(o, enum.Enum) else o for o in (options or [])]
        if isinstance(options, type) and issubclass(options, enum.Enum):
            choices = [o.value for o in options]
        spec = super().Input(id, display_name, optional, tooltip, lazy, default, **extra)
        spec.choices = choices
        return spec


class MultiType:
    """An input accepting several types (`io.MultiType.Input(io.Image.Input("x"), types=[...])`)."""

    @staticmethod
    def Input(id: Any, types: list[Any] | None = None, display_name: str | None = None,  # noqa: N802
              optional: bool = False, tooltip: str | None = None, **extra: Any) -> InputSpec:
        names = [t.io_type for t in types or ()]
        base = id if isinstance(id, InputSpec) else InputSpec("*", id, display_name, optional,
                                                             tooltip)
        kinds = [base.io_type] if base.io_type != "*" else []
        base.io_type = ",".join(dict.fromkeys(kinds + names)) or "*"
        return base


@dataclass
class DynamicComboSpec(InputSpec):
    """`io.DynamicCombo.Input`: a drop-down whose chosen option brings its own inputs."""

    option_inputs: list[tuple[str, list[InputSpec]]] = field(default_factory=list)

    def loom_input(self) -> LoomInput:
        from engine.dynamic_inputs import ComboOption
        from engine.dynamic_inputs import DynamicCombo as loom_dynamic_combo
        options = tuple(ComboOption(key, tuple(spec.loom_input() for spec in inputs))
                        for key, inputs in self.option_inputs)
        return loom_dynamic_combo(self.id, options, optional=self.optional, tooltip=self.tooltip)


class DynamicCombo:
    """`io.DynamicCombo`: execute receives {"<id>": chosen key, "<input>": value, ...}."""

    io_type = "COMFY_DYNAMICCOMBO_V3"

    @dataclass
    class Option:
        key: str
        inputs: list[InputSpec] = field(default_factory=list)

    @staticmethod
    def Input(id: str, options: list[DynamicCombo.Option], display_name: str | None = None,  # noqa: N802
              optional: bool = False, tooltip: str | None = None, lazy: bool | None = None,
              extra_dict: Any = None) -> InputSpec:
        return DynamicComboSpec(DynamicCombo.io_type, id, display_name, optional, tooltip, lazy,
                                option_inputs=[(o.key, list(o.inputs)) for o in options])


@dataclass
class AutogrowSpec(InputSpec):
    """`io.Autogrow.Input`: a template socket repeated as the user connects more."""

    template: Any = None

    def loom_input(self) -> LoomInput:
        from engine.dynamic_inputs import Autogrow as loom_autogrow
        from engine.dynamic_inputs import AutogrowNames as loom_autogrow_names
        template = self.template
        socket = template.input.loom_input()
        if isinstance(template, Autogrow.TemplateNames):
            return loom_autogrow_names(self.id, socket, tuple(template.names), template.min,
                                       optional=self.optional, tooltip=self.tooltip)
        return loom_autogrow(self.id, socket, template.prefix, template.min, template.max,
                             optional=self.optional, tooltip=self.tooltip)


class Autogrow:
    """`io.Autogrow`: execute receives {"<prefix>0": value, ...} or {"<name>": value, ...}."""

    io_type = "COMFY_AUTOGROW_V3"

    class TemplatePrefix:
        def __init__(self, input: InputSpec, prefix: str, min: int = 1, max: int = 10) -> None:
            self.input, self.prefix, self.min, self.max = _socket(input), prefix, min, max

    class TemplateNames:
        def __init__(self, input: InputSpec, names: list[str], min: int = 1) -> None:
            self.input, self.names, self.min = _socket(input), list(names), min

    @staticmethod
    def Input(id: str, template: Any, display_name: str | None = None,  # noqa: N802
              optional: bool = False, tooltip: str | None = None, lazy: bool | None = None,
              extra_dict: Any = None) -> InputSpec:
        if not isinstance(template, (Autogrow.TemplatePrefix, Autogrow.TemplateNames)):
            raise TypeError(f"io.Autogrow.Input({id!r}): template must be an "
                            f"Autogrow.TemplatePrefix or TemplateNames, got {template!r}")
        return AutogrowSpec(Autogrow.io_type, id, display_name, optional, tooltip, lazy,
                            template=template)


def _socket(spec: InputSpec) -> InputSpec:
    """A template input as ComfyUI uses it: a socket, never a widget."""
    return InputSpec(spec.io_type, spec.id, spec.display_name, spec.optional, spec.tooltip,
                     spec.lazy, spec.default, {**spec.options, "forceInput": True}, spec.choices)


@dataclass
class Schema:
    """A V3 node's declaration (ComfyUI's field names)."""

    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list[InputSpec] = field(default_factory=list)
    outputs: list[OutputSpec] = field(default_factory=list)
    hidden: list[Hidden] = field(default_factory=list)
    description: str = ""
    search_aliases: list[str] = field(default_factory=list)
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False
    accept_all_inputs: bool = False
    has_intermediate_output: bool = False
    price_badge: Any = None
    essentials_category: Any = None


class NodeOutput:
    """What execute returns: the output values, plus an optional `ui` for the editor."""

    def __init__(self, *args: Any, ui: Any = None, expand: Any = None,
                 block_execution: str | None = None) -> None:
        self.args = args
        self.ui = ui
        self.expand = expand
        self.block_execution = block_execution

    @property
    def result(self) -> tuple[Any, ...] | None:
        return self.args if self.args else None


class ComfyNode:
    """Base of V3 nodes: override define_schema and execute (both classmethods)."""

    hidden: ClassVar[HiddenHolder | None] = None

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError(f"{cls.__name__} must define define_schema()")

    @classmethod
    def execute(cls, **kwargs: Any) -> NodeOutput:
        raise NotImplementedError(f"{cls.__name__} must define execute()")

    @classmethod
    def GET_SCHEMA(cls) -> Schema:  # noqa: N802 - ComfyUI's name
        return cls.define_schema()

    @classmethod
    def __loom_node__(cls) -> type:
        """The Loom node type running this V3 node."""
        from comfy_api.latest.loom_node import v3_node_type
        return v3_node_type(cls)


ComfyNodeV3 = ComfyNode


class MatchType:
    """A socket whose type follows what is linked (a template shared by inputs and outputs);
    Loom validates it as any type."""

    @dataclass
    class Template:
        template_id: str
        allowed_types: Any = None

    @staticmethod
    def Input(id: str, template: Any = None, display_name: str | None = None,  # noqa: N802
              optional: bool = False, tooltip: str | None = None, lazy: bool | None = None,
              **extra: Any) -> InputSpec:
        return InputSpec("*", id, display_name, optional, tooltip, lazy)

    @staticmethod
    def Output(template: Any = None, id: str | None = None,  # noqa: N802
               display_name: str | None = None, tooltip: str | None = None,
               is_output_list: bool = False) -> OutputSpec:
        return OutputSpec("*", id, display_name, tooltip, is_output_list)


def __getattr__(name: str) -> Any:
    """Other V3 types (DynamicSlot ...) exist in ComfyUI but not in Loom's facade: a node
    declaring one fails to register with an error naming it."""
    if name[:1].isupper():
        from loom_internals import unavailable
        return unavailable(f"comfy_api.latest.io.{name}")
    raise AttributeError(name)
