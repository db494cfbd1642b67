"""Built-in nodes, one module per family. Each module exports NODE_TYPES, a tuple of Node
classes; `builtin_node_types` gathers them for the registry that main.py builds."""

from __future__ import annotations

import importlib
from typing import Any

from engine.node import Node

# Modules listed here are imported in this order; each must define NODE_TYPES.
BUILTIN_MODULES = ("nodes.utility", "nodes.image", "nodes.imageio", "nodes.latent",
                   "nodes.loaders", "nodes.vae_nodes", "nodes.text", "nodes.conditioning",
                   "nodes.inpaint", "nodes.sampling", "nodes.custom_sampling",
                   "nodes.custom_samplers", "nodes.custom_schedulers",
                   "nodes.lora", "nodes.model_merge", "nodes.model_save", "nodes.controlnet",
                   "nodes.upscale", "nodes.clip_vision", "nodes.unclip", "nodes.model_guidance",
                   "nodes.model_unet_patches", "nodes.conditioning_extras", "nodes.hooks",
                   "nodes.mask", "nodes.compositing",
                   "nodes.postprocess", "nodes.transform", "nodes.image_batch",
                   "nodes.latent_ops", "nodes.latent_operations",
                   "nodes.strings", "nodes.logic", "nodes.animation", "nodes.gligen",
                   "nodes.step_cache", "nodes.model_runtime", "nodes.image_conditioning")


def builtin_node_types() -> list[type[Node]]:
    types: list[type[Node]] = []
    for module_name in BUILTIN_MODULES:
        types.extend(importlib.import_module(module_name).NODE_TYPES)
    return types


def __getattr__(name: str) -> Any:
    """ComfyUI's `nodes` attributes for custom-node packs (NODE_CLASS_MAPPINGS, KSampler ...),
    served by the facade module comfy_compat/comfy_nodes.py once custom nodes are enabled."""
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        facade = importlib.import_module("comfy_nodes")
    except ModuleNotFoundError:
        raise AttributeError(f"module 'nodes' has no attribute {name!r}") from None
    return facade.attribute(name)
