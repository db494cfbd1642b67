"""Nodes that change how a MODEL's UNet runs on a clone (ComfyUI's comfy_extras
nodes_model_advanced ModelComputeDtype and nodes_torch_compile TorchCompileModel), through its
model function wrapper (engine/diffusion/patches/model_wrappers.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from engine.context import NodeContext
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.patches.model_wrappers import COMPILE_BACKENDS, CompiledForward, ComputeDtype
from engine.node import Combo, Link, Node, NodeSchema, Output
from nodes.sampling import require_model

COMPUTE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelComputeDtype(Node):
    """The UNet computes in fp32/fp16/bf16 on a clone; "default" goes back to the dtype the
    weights were loaded in (the device policy's), dropping an earlier choice."""

    schema = NodeSchema("ModelComputeDtype",
                        (Link("model", "MODEL"),
                         Combo("dtype", ("default", *COMPUTE_DTYPES))),
                        (Output("MODEL"),), category="advanced/debug/model",
                        python_module="comfy_extras.nodes_model_advanced")

    def execute(self, ctx: NodeContext, model: Any, dtype: str) -> tuple[ModelHandle]:
        handle = require_model(model, "ModelComputeDtype")
        if dtype != "default" and dtype not in COMPUTE_DTYPES:
            raise ValueError(f"ModelComputeDtype: unknown dtype {dtype!r}; use default, "
                             f"{', '.join(COMPUTE_DTYPES)}")
        inner = handle.model_patches.model_function_wrapper
        if isinstance(inner, ComputeDtype):  # a later choice replaces an earlier one
            inner = inner.inner
        weights_dtype = handle.unet.dtype
        if dtype == "default":
            patches = dataclasses.replace(handle.model_patches, model_function_wrapper=inner)
            return (handle.replace(model_patches=patches, dtype=weights_dtype),)
        wrapper = ComputeDtype(handle.unet, COMPUTE_DTYPES[dtype], inner)
        return (handle.replace(model_patches=handle.model_patches.with_model_function_wrapper(
            wrapper), dtype=COMPUTE_DTYPES[dtype]),)


class TorchCompileModel(Node):
    """The UNet's forward compiled with torch.compile on a clone, on its first use."""

    schema = NodeSchema("TorchCompileModel",
                        (Link("model", "MODEL"),
                         Combo("backend", COMPILE_BACKENDS, combo_style="v3",
                               options={"multiselect": False})),
                        (Output("MODEL"),), category="_for_testing", experimental=True,
                        comfy_v3=True, python_module="comfy_extras.nodes_torch_compile")

    def execute(self, ctx: NodeContext, model: Any, backend: str) -> tuple[ModelHandle]:
        handle = require_model(model, "TorchCompileModel")
        if backend not in COMPILE_BACKENDS:
            raise ValueError(f"TorchCompileModel: unknown backend {backend!r}; use one of "
                             f"{', '.join(COMPILE_BACKENDS)}")
        wrapper = CompiledForward(handle.unet, backend,
                                  handle.model_patches.model_function_wrapper)
        return (handle.patching(lambda p: p.with_model_function_wrapper(wrapper)),)


NODE_TYPES = [ModelComputeDtype, TorchCompileModel]
