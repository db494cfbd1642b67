"""Saving parts of a model as ComfyUI does (comfy_extras/nodes_model_merging): CLIPSave (one
file per text encoder, HF naming), VAESave (LDM naming) and ModelSave (`model.diffusion_model.*`
keys), each with every patch (LoRA, merges) baked in and the workflow as metadata. The files
load back through CLIPLoader, VAELoader and UNETLoader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.context import NodeContext
from engine.diffusion.checkpoints.save import save_checkpoint, save_text_encoders, save_vae
from engine.diffusion.networks.vae_model import VAE
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.text.encoding import TextEncoderStack
from engine.node import Hidden, Link, Node, NodeResult, NodeSchema, String
from nodes.filenames import SaveTarget, prepare_save
from nodes.model_merge import CATEGORY, save_metadata

SUFFIX = ".safetensors"


def _schema(name: str, link: tuple[str, str], prefix: str) -> NodeSchema:
    return NodeSchema(
        name, (Link(*link), String("filename_prefix", default=prefix),
               Hidden("prompt", "PROMPT"), Hidden("extra_pnginfo", "EXTRA_PNGINFO")),
        (), category=CATEGORY, output_node=True)


def _ui(target: SaveTarget, paths: list[Path]) -> NodeResult:
    return NodeResult(ui={"models": [{"filename": path.name, "subfolder": target.subfolder,
                                      "type": "output"} for path in paths]})


class CLIPSave(Node):
    schema = _schema("CLIPSave", ("clip", "CLIP"), "clip/ComfyUI")

    def execute(self, ctx: NodeContext, clip: TextEncoderStack, filename_prefix: str,
                prompt: Any = None, extra_pnginfo: Any = None) -> NodeResult:
        """`<prefix>_clip_l_00001_.safetensors` and so on: ComfyUI adds the encoder's name to
        the prefix and counts each name's files on its own."""
        def path_for(encoder: str) -> Path:
            target = prepare_save(ctx.paths.output, f"{filename_prefix}_{encoder}")
            return target.folder / target.file_name(0, SUFFIX)

        paths = save_text_encoders(path_for, clip, save_metadata(prompt, extra_pnginfo))
        return _ui(prepare_save(ctx.paths.output, filename_prefix), paths)


class VAESave(Node):
    schema = _schema("VAESave", ("vae", "VAE"), "vae/ComfyUI_vae")

    def execute(self, ctx: NodeContext, vae: VAE, filename_prefix: str, prompt: Any = None,
                extra_pnginfo: Any = None) -> NodeResult:
        target = prepare_save(ctx.paths.output, filename_prefix)
        path = save_vae(target.folder / target.file_name(0, SUFFIX), vae,
                        save_metadata(prompt, extra_pnginfo))
        return _ui(target, [path])


class ModelSave(Node):
    schema = _schema("ModelSave", ("model", "MODEL"), "diffusion_models/ComfyUI")

    def execute(self, ctx: NodeContext, model: ModelHandle, filename_prefix: str,
                prompt: Any = None, extra_pnginfo: Any = None) -> NodeResult:
        target = prepare_save(ctx.paths.output, filename_prefix)
        path = save_checkpoint(target.folder / target.file_name(0, SUFFIX), model, None, None,
                               save_metadata(prompt, extra_pnginfo))
        return _ui(target, [path])


NODE_TYPES = (CLIPSave, VAESave, ModelSave)
