"""ComfyUI's `nodes` module attributes for custom-node packs, on Loom's own `nodes` package:
NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, common_ksampler and every registered node as
a class callable the classic way (`nodes.CLIPTextEncode().encode(clip, text)`).

A Loom node's classic view has ComfyUI's INPUT_TYPES / RETURN_TYPES (from its declaration) and
its FUNCTION under ComfyUI's method name; calling it runs the Loom node in the running node's
context, MODEL/CLIP/VAE converted both ways. `nodes/__init__.py` forwards unknown attributes
here, and `comfy_extras.*` modules expose the same views, grouped as ComfyUI groups them."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from engine.classic import ClassicNode
from engine.comfy_host import HOST, from_pack, node_context, to_pack
from engine.node import MISSING, Node, NodeResult
from engine.schema import object_info_entry
from nodes import imaging

MODULES_FILE = Path(__file__).with_name("comfy_node_modules.json")
# ComfyUI's FUNCTION (method name) of its classic core nodes (facts of its node API); nodes
# not listed use "execute", the method of ComfyUI's V3 nodes.
FUNCTION_NAMES = {
    "CLIPTextEncode": "encode", "CLIPTextEncodeSDXL": "encode",
    "CLIPTextEncodeSDXLRefiner": "encode", "CLIPSetLastLayer": "set_last_layer",
    "CheckpointLoaderSimple": "load_checkpoint", "CheckpointLoader": "load_checkpoint",
    "unCLIPCheckpointLoader": "load_checkpoint", "DiffusersLoader": "load_checkpoint",
    "VAELoader": "load_vae", "UNETLoader": "load_unet", "CLIPLoader": "load_clip",
    "DualCLIPLoader": "load_clip", "LoraLoader": "load_lora",
    "LoraLoaderModelOnly": "load_lora_model_only", "ControlNetLoader": "load_controlnet",
    "DiffControlNetLoader": "load_controlnet", "ControlNetApply": "apply_controlnet",
    "ControlNetApplyAdvanced": "apply_controlnet", "CLIPVisionLoader": "load_clip",
    "CLIPVisionEncode": "encode", "StyleModelLoader": "load_style_model",
    "StyleModelApply": "apply_stylemodel", "unCLIPConditioning": "apply_adm",
    "GLIGENLoader": "load_gligen", "GLIGENTextBoxApply": "append",
    "HypernetworkLoader": "load_hypernetwork", "UpscaleModelLoader": "load_model",
    "ImageUpscaleWithModel": "upscale", "VAEDecode": "decode", "VAEDecodeTiled": "decode",
    "VAEEncode": "encode", "VAEEncodeTiled": "encode", "VAEEncodeForInpaint": "encode",
    "InpaintModelConditioning": "encode", "KSampler": "sample", "KSamplerAdvanced": "sample",
    "EmptyLatentImage": "generate", "LatentUpscale": "upscale", "LatentUpscaleBy": "upscale",
    "LatentFromBatch": "frombatch", "RepeatLatentBatch": "repeat",
    "LatentComposite": "composite", "LatentBlend": "blend", "LatentCrop": "crop",
    "LatentFlip": "flip", "LatentRotate": "rotate", "SetLatentNoiseMask": "set_mask",
    "SaveLatent": "save", "LoadLatent": "load", "SaveImage": "save_images",
    "PreviewImage": "save_images", "LoadImage": "load_image", "LoadImageMask": "load_image",
    "LoadImageOutput": "load_image", "ImageScale": "upscale", "ImageScaleBy": "upscale",
    "ImageInvert": "invert", "ImageBatch": "batch", "ImagePadForOutpaint": "expand_image",
    "EmptyImage": "generate", "ConditioningCombine": "combine",
    "ConditioningAverage": "addWeighted", "ConditioningConcat": "concat",
    "ConditioningSetArea": "append", "ConditioningSetAreaPercentage": "append",
    "ConditioningSetAreaStrength": "append", "ConditioningSetMask": "append",
    "ConditioningZeroOut": "zero_out", "ConditioningSetTimestepRange": "set_range",
    "CheckpointSave": "save", "ModelMergeSimple": "merge", "ModelMergeBlocks": "merge",
    "ModelMergeSubtract": "merge", "ModelMergeAdd": "merge", "CLIPMergeSimple": "merge",
    "ModelSamplingDiscrete": "patch", "ImageCrop": "crop", "LatentBatch": "batch",
    "KSamplerSelect": "get_sampler", "BasicScheduler": "get_sigmas",
    "KarrasScheduler": "get_sigmas", "ExponentialScheduler": "get_sigmas",
    "PolyexponentialScheduler": "get_sigmas", "SDTurboScheduler": "get_sigmas",
    "SplitSigmas": "get_sigmas", "FlipSigmas": "get_sigmas", "SamplerCustom": "sample",
    "BasicGuider": "get_guider", "CFGGuider": "get_guider", "RandomNoise": "get_noise",
    "DisableNoise": "get_noise", "GrowMask": "expand_mask", "LatentCompositeMasked": "composite",
    "JoinImageWithAlpha": "join_image_with_alpha", "ImageCompositeMasked": "composite",
    "SolidMask": "solid", "InvertMask": "invert", "MaskToImage": "mask_to_image",
    "ImageToMask": "image_to_mask", "FeatherMask": "feather", "CropMask": "crop",
    "MaskComposite": "combine", "ThresholdMask": "image_to_mask",
    "DifferentialDiffusion": "apply", "FreeU": "patch", "FreeU_V2": "patch",
}


# ComfyUI's parameter order of core node methods where it differs from the input order
# (`CLIPTextEncode().encode(clip, text)` although the inputs are text, clip).
PARAMETER_ORDER: dict[str, tuple[str, ...]] = {
    "CLIPTextEncode": ("clip", "text"), "VAEDecode": ("vae", "samples"),
    "VAEEncode": ("vae", "pixels"),
    "VAEDecodeTiled": ("vae", "samples", "tile_size", "overlap", "temporal_size",
                       "temporal_overlap"),
    "VAEEncodeTiled": ("vae", "pixels", "tile_size", "overlap", "temporal_size",
                       "temporal_overlap"),
    "VAEEncodeForInpaint": ("vae", "pixels", "mask", "grow_mask_by"),
    "InpaintModelConditioning": ("positive", "negative", "pixels", "vae", "mask", "noise_mask"),
    "ConditioningSetMask": ("conditioning", "mask", "set_cond_area", "strength"),
    # PreviewImage inherits SaveImage.save_images; its filename_prefix is ignored (temp names)
    "PreviewImage": ("images", "filename_prefix", "prompt", "extra_pnginfo"),
}
# Class attributes of ComfyUI's core classes that packs read (e.g. ImageScale.upscale_methods).
CLASS_ATTRIBUTES: dict[str, dict[str, Any]] = {
    "ImageScale": {"upscale_methods": list(imaging.IMAGE_UPSCALE_METHODS),
                   "crop_methods": list(imaging.CROP_METHODS)},
    "ImageScaleBy": {"upscale_methods": list(imaging.IMAGE_UPSCALE_METHODS)},
    "LatentUpscale": {"upscale_methods": list(imaging.LATENT_UPSCALE_METHODS),
                      "crop_methods": list(imaging.CROP_METHODS)},
    "LatentUpscaleBy": {"upscale_methods": list(imaging.LATENT_UPSCALE_METHODS)},
}


def node_modules() -> dict[str, list[str]]:
    """ComfyUI's module of each of its built-in node types (from its /object_info)."""
    return json.loads(MODULES_FILE.read_text(encoding="utf-8"))


def _registry() -> Any:
    registry = HOST.registry
    if registry is None:
        raise RuntimeError("nodes.NODE_CLASS_MAPPINGS is read before Loom bound its node "
                           "registry (main.py does so before custom nodes load)")
    return registry


def is_registered(class_type: str) -> bool:
    return HOST.registry is not None and class_type in HOST.registry


def classic_class(class_type: str) -> type:
    """The class ComfyUI's NODE_CLASS_MAPPINGS holds for `class_type`: a pack's own class, or
    the classic view of a Loom node."""
    node_type = _registry().get(class_type)
    if node_type is None:
        raise KeyError(class_type)
    if issubclass(node_type, ClassicNode):
        return node_type.classic
    return _VIEWS.view(node_type)


class _ViewCache:
    """One classic view class per Loom node type (so `isinstance` and identity hold)."""

    def __init__(self) -> None:
        self._views: dict[type[Node], type] = {}

    def view(self, node_type: type[Node]) -> type:
        found = self._views.get(node_type)
        if found is None:
            found = self._views[node_type] = _make_view(node_type)
        return found


_VIEWS = _ViewCache()


def _make_view(node_type: type[Node]) -> type:
    schema = node_type.schema
    function = FUNCTION_NAMES.get(schema.name, "execute")
    entry = object_info_entry(schema, HOST.services)

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _call(node_type, args, kwargs)

    def input_types(cls: type) -> dict[str, Any]:
        return object_info_entry(schema, HOST.services)["input"]

    namespace = {
        "__doc__": f"Loom's {schema.name} node, callable the classic way.",
        "INPUT_TYPES": classmethod(input_types), "RETURN_TYPES": tuple(entry["output"]),
        "RETURN_NAMES": tuple(entry["output_name"]), "FUNCTION": function,
        "CATEGORY": schema.category, "OUTPUT_NODE": schema.output_node,
        "OUTPUT_IS_LIST": tuple(entry["output_is_list"]), "DESCRIPTION": schema.description,
        "loom_node": node_type, function: run, "execute": run,
        **CLASS_ATTRIBUTES.get(schema.name, {}),
    }
    return type(schema.name, (), namespace)


def _call(node_type: type[Node], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run a Loom node with classic-style arguments; returns ComfyUI's tuple or ui dict."""
    schema = node_type.schema
    names = list(PARAMETER_ORDER.get(schema.name, [spec.name for spec in schema.inputs]))
    if len(args) > len(names):
        raise TypeError(f"{schema.name}: got {len(args)} positional arguments, it takes "
                        f"{len(names)} ({', '.join(names)})")
    values = dict(zip(names, args, strict=False))  # fewer positional args than names
    clash = sorted(set(values) & set(kwargs))
    if clash:
        raise TypeError(f"{schema.name}: argument(s) {clash} given twice")
    values.update(kwargs)
    unknown = sorted(name for name in values if not schema.declares(name) and name not in names)
    if unknown:
        raise TypeError(f"{schema.name}: unexpected argument(s) {unknown}; it takes "
                        f"{', '.join(names)}")
    values = {name: value for name, value in values.items() if schema.declares(name)}
    for spec in schema.inputs:
        if spec.name not in values:
            values[spec.name] = None if spec.default is MISSING else spec.default
    values = {name: from_pack(value) for name, value in values.items()}
    result = node_type().execute(node_context(schema.name), **values)
    if isinstance(result, NodeResult):
        outputs = tuple(to_pack(v) for v in result.outputs)
        return {"ui": result.ui, "result": outputs} if result.ui is not None else outputs
    return tuple(to_pack(v) for v in result)


class ClassMappings(Mapping):
    """NODE_CLASS_MAPPINGS: every registered node type (built-in and packs') by name."""

    def __getitem__(self, class_type: str) -> type:
        return classic_class(class_type)

    def __iter__(self) -> Iterator[str]:
        return iter(list(_registry()))

    def __len__(self) -> int:
        return len(_registry())


class DisplayNameMappings(Mapping):
    """NODE_DISPLAY_NAME_MAPPINGS: the display name of every node type that declares one."""

    def __getitem__(self, class_type: str) -> str:
        node_type = _registry().get(class_type)
        if node_type is None or not node_type.schema.display_name:
            raise KeyError(class_type)
        return node_type.schema.display_name

    def __iter__(self) -> Iterator[str]:
        registry = _registry()
        return iter([name for name in registry if registry.get(name).schema.display_name])

    def __len__(self) -> int:
        return sum(1 for _ in self)


NODE_CLASS_MAPPINGS = ClassMappings()
NODE_DISPLAY_NAME_MAPPINGS = DisplayNameMappings()


def common_ksampler(model: Any, seed: int, steps: int, cfg: float, sampler_name: str,
                    scheduler: str, positive: Any, negative: Any, latent: Any,
                    denoise: float = 1.0, disable_noise: bool = False,
                    start_step: int | None = None, last_step: int | None = None,
                    force_full_denoise: bool = False) -> tuple[Any]:
    """ComfyUI's shared KSampler body, over Loom's sampler (progress to the running node)."""
    from engine.diffusion.sampling.ksampler import sample
    from nodes.sampling import node_progress, require_model

    handle = require_model(from_pack(model), "common_ksampler")
    ctx = node_context("KSampler")
    return (sample(handle, positive, negative, latent, seed=seed, steps=steps, cfg=cfg,
                   sampler_name=sampler_name, scheduler=scheduler, denoise=denoise,
                   add_noise=not disable_noise, start_step=start_step, end_step=last_step,
                   force_full_denoise=force_full_denoise,
                   progress=node_progress(ctx, handle)),)


def attribute(name: str) -> Any:
    """`nodes.<name>` for ComfyUI's names Loom's package does not define itself."""
    if name in _MODULE_ATTRIBUTES:
        return _MODULE_ATTRIBUTES[name]
    if HOST.registry is not None and name in HOST.registry:
        return classic_class(name)
    raise AttributeError(f"module 'nodes' has no attribute {name!r}: it is neither a node type "
                         f"registered in Loom nor one of ComfyUI's nodes.py helpers Loom "
                         f"provides ({', '.join(sorted(_MODULE_ATTRIBUTES))})")


def init_extra_nodes(init_custom_nodes: bool = True, init_api_nodes: bool = True) -> list[str]:
    raise NotImplementedError("nodes.init_extra_nodes: Loom loads custom nodes itself at start")


_MODULE_ATTRIBUTES: dict[str, Any] = {
    "MAX_RESOLUTION": imaging.MAX_RESOLUTION,
    "NODE_CLASS_MAPPINGS": NODE_CLASS_MAPPINGS,
    "NODE_DISPLAY_NAME_MAPPINGS": NODE_DISPLAY_NAME_MAPPINGS,
    "common_ksampler": common_ksampler, "init_extra_nodes": init_extra_nodes,
    "EXTENSION_WEB_DIRS": {}, "LOADED_MODULE_DIRS": {},
}
