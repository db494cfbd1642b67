"""Model merging nodes and CheckpointSave.

A merge is a patch on a clone of model1 (MergePatch): while applied, every weight becomes
own * w1 + other * w2, both read under their own handle's patches (a LoRA on either side is
merged too). ComfyUI's rules: ModelMergeSimple ratio r -> r * w1 + (1 - r) * w2 (r = 1 keeps
model1); ModelMergeBlocks picks r by the longest matching name prefix among "input", "middle"
and "out" (other weights take the first ratio); Add -> w1 + w2; Subtract m -> m * (w1 - w2);
CLIPMergeSimple like ModelMergeSimple, CLIPMergeAdd/Subtract like ModelMergeAdd/Subtract, all
leaving logit_scale alone; ModelMergeSD1/SD2/SDXL take one ratio per UNet block."""

from __future__ import annotations

import json
from typing import Any

from engine.context import NodeContext
from engine.diffusion.checkpoints.save import save_checkpoint
from engine.diffusion.networks.vae_model import VAE
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.patches.weight_patches import MergePatch, MergeRule, WeightSource
from engine.diffusion.text.encoding import TextEncoderStack
from engine.node import Float, Hidden, Link, Node, NodeResult, NodeSchema, Output, String
from nodes.filenames import prepare_save

CATEGORY = "advanced/model_merging"
RATIO = {"min": 0.0, "max": 1.0, "step": 0.01}


def _blend(ratio: float) -> tuple[float, float]:
    return (ratio, 1.0 - ratio)


def merge_models(model1: ModelHandle, model2: ModelHandle, rule: MergeRule) -> ModelHandle:
    """A clone of model1 whose weights follow `rule` against model2's. Models of one family
    may differ in a few shapes (an inpainting UNet's input); those weights keep model1's."""
    if model1.family != model2.family:
        raise ValueError(f"cannot merge {model1.name or model1.family} ({model1.family}) with "
                         f"{model2.name or model2.family} ({model2.family}): they are different "
                         "model families; merge models of the same family")
    source = WeightSource.of(model2.unet, model2.patches, model1.unet)
    return model1.replace(patches=model1.patches + (MergePatch(source, rule),))


def _models(kind: str, *extra: Any) -> NodeSchema:
    return NodeSchema(kind, (Link("model1", "MODEL"), Link("model2", "MODEL"), *extra),
                      (Output("MODEL"),), category=CATEGORY)


class ModelMergeSimple(Node):
    schema = _models("ModelMergeSimple", Float("ratio", 1.0, **RATIO))

    def execute(self, ctx: NodeContext, model1: ModelHandle, model2: ModelHandle,
                ratio: float) -> tuple[ModelHandle]:
        return (merge_models(model1, model2, MergeRule(_blend(ratio))),)


class ModelMergeBlocks(Node):
    schema = _models("ModelMergeBlocks", Float("input", 1.0, **RATIO),
                     Float("middle", 1.0, **RATIO), Float("out", 1.0, **RATIO))

    def execute(self, ctx: NodeContext, model1: ModelHandle, model2: ModelHandle, input: float,
                middle: float, out: float) -> tuple[ModelHandle]:
        prefixes = tuple((prefix, *_blend(ratio)) for prefix, ratio in
                         (("input", input), ("middle", middle), ("out", out)))
        return (merge_models(model1, model2, MergeRule(_blend(input), prefixes)),)


class ModelMergeAdd(Node):
    schema = _models("ModelMergeAdd")

    def execute(self, ctx: NodeContext, model1: ModelHandle, model2: ModelHandle
                ) -> tuple[ModelHandle]:
        return (merge_models(model1, model2, MergeRule((1.0, 1.0))),)


class ModelMergeSubtract(Node):
    schema = _models("ModelMergeSubtract",
                     Float("multiplier", 1.0, min=-10.0, max=10.0, step=0.01))

    def execute(self, ctx: NodeContext, model1: ModelHandle, model2: ModelHandle,
                multiplier: float) -> tuple[ModelHandle]:
        return (merge_models(model1, model2, MergeRule((multiplier, -multiplier))),)


def merge_clips(clip1: TextEncoderStack, clip2: TextEncoderStack,
                scales: tuple[float, float]) -> TextEncoderStack:
    """A clone of clip1 whose encoders are own * scales[0] + clip2's * scales[1] (logit_scale
    kept)."""
    if clip1.family != clip2.family:
        raise ValueError(f"cannot merge a {clip1.family} CLIP with a {clip2.family} CLIP; "
                         "merge text encoders of the same model family")
    rule = MergeRule(scales, skip=("logit_scale",))
    patches = {name: MergePatch(WeightSource.of(clip2.encoders[name],
                                                clip2.patches.get(name, ()), encoder), rule)
               for name, encoder in clip1.encoders.items()}
    return clip1.clone_with_patches(patches)


class CLIPMergeSimple(Node):
    schema = NodeSchema(
        "CLIPMergeSimple",
        (Link("clip1", "CLIP"), Link("clip2", "CLIP"), Float("ratio", 1.0, **RATIO)),
        (Output("CLIP"),), category=CATEGORY)

    def execute(self, ctx: NodeContext, clip1: TextEncoderStack, clip2: TextEncoderStack,
                ratio: float) -> tuple[TextEncoderStack]:
        return (merge_clips(clip1, clip2, _blend(ratio)),)


def _clips(kind: str, *extra: Any) -> NodeSchema:
    return NodeSchema(kind, (Link("clip1", "CLIP"), Link("clip2", "CLIP"), *extra),
                      (Output("CLIP"),), category=CATEGORY)


class CLIPMergeAdd(Node):
    schema = _clips("CLIPMergeAdd")

    def execute(self, ctx: NodeContext, clip1: TextEncoderStack, clip2: TextEncoderStack
                ) -> tuple[TextEncoderStack]:
        return (merge_clips(clip1, clip2, (1.0, 1.0)),)


class CLIPMergeSubtract(Node):
    schema = _clips("CLIPMergeSubtract", Float("multiplier", 1.0, min=-10.0, max=10.0, step=0.01))

    def execute(self, ctx: NodeContext, clip1: TextEncoderStack, clip2: TextEncoderStack,
                multiplier: float) -> tuple[TextEncoderStack]:
        return (merge_clips(clip1, clip2, (multiplier, -multiplier)),)


def _block_prefixes(input_blocks: int, output_blocks: int, dot: str) -> tuple[str, ...]:
    """The per-block ratio names of ComfyUI's model-specific merges, in widget order (SDXL's
    block names have no trailing dot)."""
    return ("time_embed.", "label_emb.", *(f"input_blocks.{i}{dot}" for i in range(input_blocks)),
            *(f"middle_block.{i}{dot}" for i in range(3)),
            *(f"output_blocks.{i}{dot}" for i in range(output_blocks)), "out.")


class _BlockMerge(Node):
    """ModelMergeBlocks with one ratio per UNet block: a weight takes the ratio of the longest
    block name it starts with, else the first ratio (time_embed.); ratio r keeps r of model1."""

    prefixes: tuple[str, ...] = ()

    def execute(self, ctx: NodeContext, model1: ModelHandle, model2: ModelHandle,
                **ratios: float) -> tuple[ModelHandle]:
        by_prefix = tuple((prefix, *_blend(ratios[prefix])) for prefix in self.prefixes)
        rule = MergeRule(_blend(ratios[self.prefixes[0]]), by_prefix)
        return (merge_models(model1, model2, rule),)


def _block_merge(name: str, prefixes: tuple[str, ...]) -> type[_BlockMerge]:
    schema = NodeSchema(name, (Link("model1", "MODEL"), Link("model2", "MODEL"),
                               *(Float(prefix, 1.0, **RATIO) for prefix in prefixes)),
                        (Output("MODEL"),), category=f"{CATEGORY}/model_specific")
    return type(name, (_BlockMerge,), {"schema": schema, "prefixes": prefixes,
                                       "__doc__": _BlockMerge.__doc__})


ModelMergeSD1 = _block_merge("ModelMergeSD1", _block_prefixes(12, 12, "."))
ModelMergeSD2 = _block_merge("ModelMergeSD2", _block_prefixes(12, 12, "."))
ModelMergeSDXL = _block_merge("ModelMergeSDXL", _block_prefixes(9, 9, ""))


def save_metadata(prompt: Any, extra_pnginfo: Any) -> dict[str, str]:
    """The workflow as safetensors metadata: "prompt" and each extra_pnginfo key, as JSON."""
    metadata = {} if prompt is None else {"prompt": json.dumps(prompt)}
    for key, value in (extra_pnginfo or {}).items():
        metadata[key] = json.dumps(value)
    return metadata


class CheckpointSave(Node):
    schema = NodeSchema(
        "CheckpointSave",
        (Link("model", "MODEL"), Link("clip", "CLIP"), Link("vae", "VAE"),
         String("filename_prefix", default="checkpoints/ComfyUI"),
         Hidden("prompt", "PROMPT"), Hidden("extra_pnginfo", "EXTRA_PNGINFO")),
        (), category=CATEGORY, display_name="Save Checkpoint", output_node=True,
        description="Writes model, CLIP and VAE (patches applied) as one .safetensors file in "
                    "the original checkpoint layout, under the output folder.")

    def execute(self, ctx: NodeContext, model: ModelHandle, clip: TextEncoderStack, vae: VAE,
                filename_prefix: str = "checkpoints/ComfyUI", prompt: Any = None,
                extra_pnginfo: Any = None) -> NodeResult:
        target = prepare_save(ctx.paths.output, filename_prefix)
        path = target.folder / target.file_name(0, ".safetensors")
        save_checkpoint(path, model, clip, vae, save_metadata(prompt, extra_pnginfo))
        return NodeResult(ui={"checkpoints": [{"filename": path.name,
                                               "subfolder": target.subfolder,
                                               "type": "output"}]})


NODE_TYPES = (ModelMergeSimple, ModelMergeBlocks, ModelMergeAdd, ModelMergeSubtract,
              CLIPMergeSimple, CLIPMergeAdd, CLIPMergeSubtract, ModelMergeSD1, ModelMergeSD2,
              ModelMergeSDXL, CheckpointSave)
