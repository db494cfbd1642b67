"""LoRA and hypernetwork loaders: clones of MODEL/CLIP carrying the file's patches.

Files are parsed once per file (size + mtime) through the model manager and shared by every
node and prompt; the inputs are never changed. Keys a model cannot use are reported in the log
and in the node's UI output ("lora_report")."""

from __future__ import annotations

from typing import Any

from safetensors.torch import save_file

from engine.context import NodeContext
from engine.diffusion.checkpoints.addon_files import load_hypernetwork, load_lora_file
from engine.diffusion.checkpoints.lora_extract import LoraType, model_lora, text_lora
from engine.diffusion.patches.hypernetwork import Hypernetwork, HypernetworkPatch
from engine.diffusion.patches.lora import LoraFile, LoraReport, apply_lora
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.text.encoding import TextEncoderStack
from engine.node import (
    Boolean,
    Combo,
    FilesIn,
    Float,
    Hidden,
    Int,
    Link,
    Node,
    NodeResult,
    NodeSchema,
    Output,
    String,
)
from nodes.filenames import prepare_save
from nodes.loaders import file_fingerprint, load_model_file

STRENGTH = {"min": -100.0, "max": 100.0, "step": 0.01}


def lora_file(ctx: NodeContext, lora_name: str) -> LoraFile:
    """The parsed LoRA file, shared through the model manager."""
    return load_model_file(ctx, "loras", lora_name, "lora",
                           lambda models, path: load_lora_file(
                               path, allow_pickle=models.allow_pickle))


def _require(value: Any, what: str, node: str) -> Any:
    if value is None:
        raise ValueError(f"{node}: the {what} input is empty; connect a loader that provides "
                         f"a {what.upper()}")
    return value


def _result(outputs: tuple[Any, ...], report: LoraReport) -> NodeResult:
    ui = {"lora_report": [report.summary()]} if report.unmatched else None
    return NodeResult(outputs, ui)


class LoraLoader(Node):
    schema = NodeSchema(
        "LoraLoader",
        (Link("model", "MODEL"), Link("clip", "CLIP"), Combo("lora_name", FilesIn("loras")),
         Float("strength_model", 1.0, **STRENGTH), Float("strength_clip", 1.0, **STRENGTH)),
        (Output("MODEL"), Output("CLIP")), category="loaders", display_name="Load LoRA",
        description="Adds a LoRA (kohya, diffusers/PEFT, LoCon, LoHa, LoKr, full diff) to a "
                    "model and its text encoder; chain several to stack them.")

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        return file_fingerprint(ctx, "loras", inputs["lora_name"])

    def execute(self, ctx: NodeContext, model: ModelHandle, clip: TextEncoderStack,
                lora_name: str, strength_model: float, strength_clip: float) -> NodeResult:
        _require(model, "model", "LoraLoader")
        if strength_model == 0 and strength_clip == 0:
            return NodeResult((model, clip))
        lora = lora_file(ctx, lora_name)
        new_model, new_clip, report = apply_lora(model, clip, lora, strength_model,
                                                 strength_clip)
        return _result((new_model, new_clip), report)


class LoraLoaderModelOnly(Node):
    schema = NodeSchema(
        "LoraLoaderModelOnly",
        (Link("model", "MODEL"), Combo("lora_name", FilesIn("loras")),
         Float("strength_model", 1.0, **STRENGTH)),
        (Output("MODEL"),), category="loaders",
        description="Adds a LoRA to the diffusion model only; its text-encoder part is unused.")

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        return file_fingerprint(ctx, "loras", inputs["lora_name"])

    def execute(self, ctx: NodeContext, model: ModelHandle, lora_name: str,
                strength_model: float) -> NodeResult:
        _require(model, "model", "LoraLoaderModelOnly")
        if strength_model == 0:
            return NodeResult((model,))
        new_model, _, report = apply_lora(model, None, lora_file(ctx, lora_name),
                                          strength_model, 0.0)
        return _result((new_model,), report)


def hypernetwork_file(ctx: NodeContext, name: str) -> Hypernetwork:
    return load_model_file(ctx, "hypernetworks", name, "hypernetwork",
                           lambda models, path: load_hypernetwork(
                               path, allow_pickle=models.allow_pickle))


class HypernetworkLoader(Node):
    schema = NodeSchema(
        "HypernetworkLoader",
        (Link("model", "MODEL"),
         Combo("hypernetwork_name", FilesIn("hypernetworks"), combo_style="v3"),
         Float("strength", 1.0, min=-10.0, max=10.0, step=0.01)),
        (Output("MODEL"),), category="loaders",
        description="Applies an A1111 hypernetwork to the model's cross-attention.")

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        return file_fingerprint(ctx, "hypernetworks", inputs["hypernetwork_name"])

    def execute(self, ctx: NodeContext, model: ModelHandle, hypernetwork_name: str,
                strength: float) -> tuple[ModelHandle]:
        _require(model, "model", "HypernetworkLoader")
        if strength == 0:
            return (model,)
        patch = HypernetworkPatch(hypernetwork_file(ctx, hypernetwork_name), strength)
        return (model.replace(patches=model.patches + (patch,)),)


class LoraSave(Node):
    """Extracts a LoRA from a model difference (ModelMergeSubtract / CLIPMergeSubtract output)
    by truncated SVD and writes it under the output folder in ComfyUI's key format
    (engine/diffusion/checkpoints/lora_extract.py)."""

    schema = NodeSchema(
        "LoraSave",
        (String("filename_prefix", "loras/ComfyUI_extracted_lora",
                options={"multiline": False}),
         Int("rank", 8, min=1, max=4096, step=1),
         Combo("lora_type", tuple(kind.value for kind in LoraType), combo_style="v3"),
         Boolean("bias_diff", True),
         Link("model_diff", "MODEL", optional=True,
              tooltip="The ModelSubtract output to be converted to a lora."),
         Link("text_encoder_diff", "CLIP", optional=True,
              tooltip="The CLIPSubtract output to be converted to a lora."),
         Hidden("prompt", "PROMPT"), Hidden("extra_pnginfo", "EXTRA_PNGINFO")),
        (), category="_for_testing", display_name="Extract and Save Lora", output_node=True,
        experimental=True, python_module="comfy_extras.nodes_lora_extract", comfy_v3=True)

    def execute(self, ctx: NodeContext, filename_prefix: str, rank: int, lora_type: str,
                bias_diff: bool, model_diff: ModelHandle | None = None,
                text_encoder_diff: TextEncoderStack | None = None, prompt: Any = None,
                extra_pnginfo: Any = None) -> NodeResult:
        """Nothing connected: nothing written (as ComfyUI)."""
        if model_diff is None and text_encoder_diff is None:
            return NodeResult()
        kind = LoraType(lora_type)
        target = prepare_save(ctx.paths.output, filename_prefix)
        tensors = {}
        if model_diff is not None:
            tensors.update(model_lora(model_diff, rank, kind, bias_diff))
        if text_encoder_diff is not None:
            tensors.update(text_lora(text_encoder_diff, rank, kind, bias_diff))
        save_file(tensors, str(target.folder / target.file_name(0, ".safetensors")))
        return NodeResult()


NODE_TYPES = (LoraLoader, LoraLoaderModelOnly, HypernetworkLoader, LoraSave)
