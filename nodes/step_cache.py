"""Step caching nodes (ComfyUI's comfy_extras nodes_easycache: EasyCache, LazyCache): each
returns a clone of the MODEL whose model function wrapper skips the model on steps whose
input changed little (engine/diffusion/patches/step_cache.py has the rule)."""

from __future__ import annotations

from typing import Any

from engine.context import NodeContext
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.patches.step_cache import StepCache
from engine.node import Boolean, Float, Link, Node, NodeSchema, Output

CATEGORY = "advanced/debug/model"
LAZY_DESCRIPTION = (
    "A homebrew version of EasyCache - even 'easier' version of EasyCache to implement. "
    "Overall works worse than EasyCache, but better in some rare cases AND universal "
    "compatibility with everything in ComfyUI.")


def cache_schema(name: str, description: str) -> NodeSchema:
    percent = {"min": 0.0, "max": 1.0, "step": 0.01}
    return NodeSchema(
        name, (Link("model", "MODEL"),
               Float("reuse_threshold", 0.2, min=0.0, max=3.0, step=0.01),
               Float("start_percent", 0.15, **percent), Float("end_percent", 0.95, **percent),
               Boolean("verbose", False)),
        (Output("MODEL", tooltip=f"The model with {name}."),), category=CATEGORY,
        display_name=name, description=description, experimental=True, comfy_v3=True,
        python_module="comfy_extras.nodes_easycache")


def with_step_cache(model: Any, node: str, whole_batch: bool, reuse_threshold: float,
                    start_percent: float, end_percent: float, verbose: bool
                    ) -> tuple[ModelHandle]:
    """A clone of `model` wearing a fresh StepCache; its sigmas come from the model's
    schedule (ComfyUI's percent_to_sigma)."""
    if not isinstance(model, ModelHandle):
        raise TypeError(f"{node}: the model input must be a MODEL (from a checkpoint loader), "
                        f"got {type(model).__name__}")
    sampling = model.sampling
    cache = StepCache(node, reuse_threshold, sampling.percent_to_sigma(start_percent),
                      sampling.percent_to_sigma(end_percent), whole_batch, verbose)
    return (model.patching(lambda p: p.with_model_function_wrapper(cache)),)


class EasyCache(Node):
    schema = cache_schema("EasyCache", "Native EasyCache implementation.")

    def execute(self, ctx: NodeContext, model: Any, reuse_threshold: float,
                start_percent: float, end_percent: float, verbose: bool) -> tuple[ModelHandle]:
        return with_step_cache(model, "EasyCache", False, reuse_threshold, start_percent,
                               end_percent, verbose)


class LazyCache(Node):
    schema = cache_schema("LazyCache", LAZY_DESCRIPTION)

    def execute(self, ctx: NodeContext, model: Any, reuse_threshold: float,
                start_percent: float, end_percent: float, verbose: bool) -> tuple[ModelHandle]:
        return with_step_cache(model, "LazyCache", True, reuse_threshold, start_percent,
                               end_percent, verbose)


NODE_TYPES = (EasyCache, LazyCache)
