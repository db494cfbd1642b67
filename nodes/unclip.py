"""unCLIP nodes: unCLIPCheckpointLoader (an SD 2.1 unCLIP checkpoint's MODEL, CLIP, VAE and the
CLIP vision tower it carries) and unCLIPConditioning, which adds an image embedding to a
CONDITIONING. At sampling time the embedding is noised to `noise_augmentation` and becomes an
unCLIP model's `y`; for SDXL its first 1280 numbers replace the pooled text ("revision")
(engine/diffusion/sampling/conditioning.py, networks/noise_augment.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.context import NodeContext
from engine.diffusion.checkpoints.loader import checkpoint_weight_bytes, load_checkpoint
from engine.diffusion.checkpoints.safetensors_io import weight_bytes
from engine.diffusion.checkpoints.state_files import open_state_file
from engine.diffusion.checkpoints.unclip import UNCLIP_VISION_PREFIX, load_unclip_vision
from engine.diffusion.memory.model_manager import ModelManager
from engine.diffusion.networks.clip_vision import ClipVisionOutput
from engine.node import Combo, FilesIn, Float, Link, Node, NodeSchema, Output
from nodes.loaders import embedding_finder, file_fingerprint, load_model_file, manager


class unCLIPCheckpointLoader(Node):  # noqa: N801 -- ComfyUI's class name
    schema = NodeSchema(
        "unCLIPCheckpointLoader", (Combo("ckpt_name", FilesIn("checkpoints")),),
        (Output("MODEL"), Output("CLIP"), Output("VAE"), Output("CLIP_VISION")),
        category="loaders")

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        return file_fingerprint(ctx, "checkpoints", inputs["ckpt_name"])

    def execute(self, ctx: NodeContext, ckpt_name: str) -> tuple[Any, Any, Any, Any]:
        def build(models: ModelManager, path: Path) -> tuple[Any, Any, Any, Any]:
            opened = open_state_file(path, allow_pickle=models.allow_pickle)
            loaded = load_checkpoint(opened, models.policy, ctx.services.bpe.get(),
                                     find_embedding=embedding_finder(ctx))
            vision = load_unclip_vision(opened.tensors, models.policy.text_dtype,
                                        models.policy.offload_device)
            return loaded.model, loaded.clip, loaded.vae, vision

        return load_model_file(ctx, "checkpoints", ckpt_name, "unclip_checkpoint", build,
                               manager(ctx).policy, size=unclip_weight_bytes)


def unclip_weight_bytes(models: ModelManager, path: Path) -> int:
    """Bytes an unCLIP checkpoint's load keeps: the checkpoint's parts and the vision tower
    (in the text encoders' dtype), from the header."""
    opened = open_state_file(path, allow_pickle=models.allow_pickle)
    vision = weight_bytes(opened.tensors, {UNCLIP_VISION_PREFIX: models.policy.text_dtype})
    return checkpoint_weight_bytes(opened, models.policy) + vision


class unCLIPConditioning(Node):  # noqa: N801 -- ComfyUI's class name
    schema = NodeSchema(
        "unCLIPConditioning",
        (Link("conditioning", "CONDITIONING"), Link("clip_vision_output", "CLIP_VISION_OUTPUT"),
         Float("strength", 1.0, min=-10.0, max=10.0, step=0.01),
         Float("noise_augmentation", 0.0, min=0.0, max=1.0, step=0.01)),
        (Output("CONDITIONING"),), category="conditioning")

    def execute(self, ctx: NodeContext, conditioning: list[Any],
                clip_vision_output: ClipVisionOutput, strength: float,
                noise_augmentation: float) -> tuple[list[Any]]:
        """Each entry's "unclip_conditioning" list gains this image (strength 0: unchanged)."""
        if strength == 0:
            return (conditioning,)
        if not hasattr(clip_vision_output, "image_embeds"):
            raise TypeError(f"unCLIPConditioning needs a CLIP_VISION_OUTPUT, got "
                            f"{type(clip_vision_output).__name__}; connect CLIP Vision Encode")
        added = {"clip_vision_output": clip_vision_output, "strength": strength,
                 "noise_augmentation": noise_augmentation}
        return ([[cond, {**options, "unclip_conditioning":
                         [*options.get("unclip_conditioning", []), added]}]
                 for cond, options in conditioning],)


NODE_TYPES = (unCLIPCheckpointLoader, unCLIPConditioning)
