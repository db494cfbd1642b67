"""GLIGEN nodes: GLIGENLoader (a GLIGEN file from models/gligen) and GLIGENTextBoxApply, which
adds a box with a phrase to each conditioning entry under options["gligen"], in ComfyUI's form
("position", model, [(phrase embedding, height, width, y, x) in latent cells, ...]). The boxes
ground the sample through the UNet's `middle_patch` point at sampling time
(engine/diffusion/networks/gligen.py, sampling/conditioning.py)."""

from __future__ import annotations

from typing import Any

from engine.context import NodeContext
from engine.diffusion.checkpoints.gligen_loader import GligenModel, load_gligen
from engine.diffusion.checkpoints.state_files import open_state_file
from engine.diffusion.networks.gligen import MAX_OBJECTS
from engine.diffusion.text.encoding import TextEncoderStack
from engine.node import Combo, FilesIn, Int, Link, Node, NodeSchema, Output, String
from nodes.imaging import MAX_RESOLUTION
from nodes.loaders import file_fingerprint, load_model_file, manager

Conditioning = list[list[Any]]
LATENT_CELL = 8  # pixels per latent cell: boxes are stored in cells, as ComfyUI does


class GLIGENLoader(Node):
    schema = NodeSchema("GLIGENLoader", (Combo("gligen_name", FilesIn("gligen")),),
                        (Output("GLIGEN"),), category="loaders")

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        return file_fingerprint(ctx, "gligen", inputs["gligen_name"])

    def execute(self, ctx: NodeContext, gligen_name: str) -> tuple[GligenModel]:
        return (load_model_file(
            ctx, "gligen", gligen_name, "gligen",
            lambda models, path: load_gligen(
                open_state_file(path, allow_pickle=models.allow_pickle), models.policy),
            manager(ctx).policy),)


def _size(name: str, default: int, minimum: int) -> Any:
    return Int(name, default, min=minimum, max=MAX_RESOLUTION, step=8)


class GLIGENTextBoxApply(Node):
    schema = NodeSchema(
        "GLIGENTextBoxApply",
        (Link("conditioning_to", "CONDITIONING"), Link("clip", "CLIP"),
         Link("gligen_textbox_model", "GLIGEN"),
         String("text", multiline=True, options={"dynamicPrompts": True}),
         _size("width", 64, 8), _size("height", 64, 8), _size("x", 0, 0), _size("y", 0, 0)),
        (Output("CONDITIONING"),), category="conditioning/gligen")

    def execute(self, ctx: NodeContext, conditioning_to: Conditioning, clip: TextEncoderStack,
                gligen_textbox_model: GligenModel, text: str, width: int, height: int, x: int,
                y: int) -> tuple[Conditioning]:
        """Each entry's boxes gain this one: the text's unprojected pooled embedding and the
        box in latent cells (pixel sizes floor-divided by 8)."""
        if clip is None:
            raise ValueError("GLIGENTextBoxApply: the clip input is empty; connect the CLIP of "
                             "the checkpoint the GLIGEN model was made for")
        phrase = clip.encode_tokens(clip.tokenize(text), projected_pooled=False).pooled
        box = (phrase, height // LATENT_CELL, width // LATENT_CELL, y // LATENT_CELL,
               x // LATENT_CELL)
        out = []
        for cond, options in conditioning_to:
            previous = list(options["gligen"][2]) if "gligen" in options else []
            if len(previous) >= MAX_OBJECTS:
                raise ValueError(f"GLIGENTextBoxApply: the conditioning already has "
                                 f"{len(previous)} boxes and GLIGEN takes at most {MAX_OBJECTS};"
                                 " chain fewer GLIGENTextBoxApply nodes")
            out.append([cond, {**options, "gligen": ("position", gligen_textbox_model,
                                                     previous + [box])}])
        return (out,)


NODE_TYPES = (GLIGENLoader, GLIGENTextBoxApply)
