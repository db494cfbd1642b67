"""ComfyUI's `comfy.model_patcher.ModelPatcher` for custom-node packs: the MODEL value as packs
see it, over Loom's ModelHandle.

`clone()` shares the handle and copies `model_options`, as ComfyUI's does; the `set_model_*`
setters write ComfyUI's model_options layout. When the MODEL goes back to Loom (a Loom node
consumes it), `loom_value()` turns those options into the handle's typed ModelPatches, which
Loom's UNet and guidance run; a patch Loom has no place for is an error naming it, never a
silently unpatched model."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from typing import Any

import torch
from loom_model_options import UnsupportedPatchError, translate
from loom_weight_patches import pack_weight_patch, record_patches

from comfy.model_base import view_for
from engine.diffusion.patches.model_handle import ModelHandle


def _activation_bytes(handle: ModelHandle, input_shape: Any) -> int:
    """A rough activation estimate (ComfyUI's order of magnitude for SD UNets)."""
    area = int(input_shape[0]) * int(input_shape[2]) * int(input_shape[3])
    return int(area * torch.finfo(handle.dtype).bits // 8 * 0.6 * 1024)


class ModelPatcher:
    """MODEL for packs: a shared Loom ModelHandle plus this clone's ComfyUI-style options."""

    def __init__(self, handle: ModelHandle, load_device: Any = None,
                 offload_device: Any = None, size: int = 0, weight_inplace_update: bool = False
                 ) -> None:
        if not isinstance(handle, ModelHandle):
            raise TypeError(f"ModelPatcher wraps a Loom MODEL; got {type(handle).__name__}. "
                            f"Loom cannot patch arbitrary torch modules as ComfyUI's "
                            f"ModelPatcher(model, ...) does")
        self.handle = handle
        self.model = view_for(handle)
        self.model_options: dict[str, Any] = {"transformer_options": {}}
        self.patches: dict[str, list[tuple[Any, ...]]] = {}
        self.object_patches: dict[str, Any] = {}
        self.load_device = load_device if load_device is not None else handle.device
        self.offload_device = offload_device if offload_device is not None else \
            torch.device("cpu")
        self.size = size
        self.patches_uuid = uuid.uuid4()
        self.parent: ModelPatcher | None = None
        self.attachments: dict[str, Any] = {}
        self.additional_models: dict[str, list[Any]] = {}
        self.callbacks: dict[str, Any] = {}
        self.wrappers: dict[str, Any] = {}

    # -- cloning -----------------------------------------------------------------------------
    def clone(self) -> ModelPatcher:
        twin = ModelPatcher(self.handle, self.load_device, self.offload_device, self.size)
        twin.model_options = _copy_options(self.model_options)
        twin.patches = {key: list(found) for key, found in self.patches.items()}
        twin.object_patches = dict(self.object_patches)
        twin.patches_uuid = self.patches_uuid
        twin.parent = self
        twin.attachments = dict(self.attachments)
        twin.additional_models = {k: list(v) for k, v in self.additional_models.items()}
        return twin

    def is_clone(self, other: Any) -> bool:
        return isinstance(other, ModelPatcher) and other.handle.unet is self.handle.unet

    def clone_has_same_weights(self, clone: Any) -> bool:
        return self.is_clone(clone) and self.patches_uuid == clone.patches_uuid

    # -- facts --------------------------------------------------------------------------------
    def model_size(self) -> int:
        return sum(p.nelement() * p.element_size() for p in self.handle.unet.parameters())

    def loaded_size(self) -> int:
        return self.model_size()

    def model_dtype(self) -> torch.dtype:
        return self.handle.dtype

    def memory_required(self, input_shape: Any) -> int:
        return _activation_bytes(self.handle, input_shape)

    def get_model_object(self, name: str) -> Any:
        """An attribute of the model by dotted path ("model_sampling", "diffusion_model.x")."""
        if name in self.object_patches:
            return self.object_patches[name]
        target: Any = self.model
        for part in name.split("."):
            target = getattr(target, part)
        return target

    def add_object_patch(self, name: str, obj: Any) -> None:
        self.object_patches[name] = obj

    # -- weight patches (LoRA-style) -------------------------------------------------------
    def add_patches(self, patches: dict[str, Any], strength_patch: float = 1.0,
                    strength_model: float = 1.0) -> list[str]:
        """Record weight patches by key (ComfyUI's format; a (key, offset[, function]) tuple
        patches a slice); keys the UNet has are returned."""
        added = record_patches(self.patches, patches, self.weight_keys, strength_patch,
                               strength_model)
        self.patches_uuid = uuid.uuid4()
        return added

    def get_key_patches(self, filter_prefix: str | None = None) -> dict[str, list[Any]]:
        """Each weight (optionally under a prefix) with its patches, the weight itself first."""
        if self.handle.patches:
            raise UnsupportedPatchError(
                f"get_key_patches on a MODEL carrying {len(self.handle.patches)} Loom weight "
                f"patch(es) (LoRA, merges): their weights are computed while sampling; merge "
                f"the models before applying LoRA, or use Loom's ModelMerge nodes")
        state = self.handle.unet.state_dict()
        found = {}
        for key, weight in state.items():
            full = f"diffusion_model.{key}"
            if filter_prefix is not None and not full.startswith(filter_prefix):
                continue
            found[full] = [(weight, _unchanged)] + list(self.patches.get(full, []))
        return found

    def model_state_dict(self, filter_prefix: str | None = None) -> dict[str, torch.Tensor]:
        state = {f"diffusion_model.{k}": v for k, v in self.handle.unet.state_dict().items()}
        return {k: v for k, v in state.items()
                if filter_prefix is None or k.startswith(filter_prefix)}

    @functools.cached_property
    def weight_keys(self) -> frozenset[str]:
        """The UNet's weight names, listed once per MODEL value (block-weight LoRA loaders call
        add_patches once per weight; listing an SDXL UNet takes ~20 ms)."""
        return frozenset(f"diffusion_model.{k}" for k in self.handle.unet.state_dict())

    # -- model_options setters (ComfyUI's layout) -----------------------------------------
    def set_model_sampler_cfg_function(self, sampler_cfg_function: Callable[..., Any],
                                       disable_cfg1_optimization: bool = False) -> None:
        self.model_options["sampler_cfg_function"] = sampler_cfg_function
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_sampler_post_cfg_function(self, post_cfg_function: Callable[..., Any],
                                            disable_cfg1_optimization: bool = False) -> None:
        self.model_options.setdefault("sampler_post_cfg_function", []).append(post_cfg_function)
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_sampler_pre_cfg_function(self, pre_cfg_function: Callable[..., Any],
                                           disable_cfg1_optimization: bool = False) -> None:
        self.model_options.setdefault("sampler_pre_cfg_function", []).append(pre_cfg_function)
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_unet_function_wrapper(self, unet_wrapper_function: Callable[..., Any]) -> None:
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    def set_model_denoise_mask_function(self, denoise_mask_function: Callable[..., Any]
                                        ) -> None:
        self.model_options["denoise_mask_function"] = denoise_mask_function

    def set_model_patch(self, patch: Callable[..., Any], name: str) -> None:
        transformer = self.model_options["transformer_options"]
        transformer.setdefault("patches", {}).setdefault(name, []).append(patch)

    def set_model_patch_replace(self, patch: Any, name: str, block_name: str, number: int,
                                transformer_index: int | None = None) -> None:
        transformer = self.model_options["transformer_options"]
        where = (block_name, number) if transformer_index is None else \
            (block_name, number, transformer_index)
        transformer.setdefault("patches_replace", {}).setdefault(name, {})[where] = patch

    def set_model_attn1_patch(self, patch: Callable[..., Any]) -> None:
        self.set_model_patch(patch, "attn1_patch")

    def set_model_attn2_patch(self, patch: Callable[..., Any]) -> None:
        self.set_model_patch(patch, "attn2_patch")

    def set_model_attn1_replace(self, patch: Any, block_name: str, number: int,
                                transformer_index: int | None = None) -> None:
        self.set_model_patch_replace(patch, "attn1", block_name, number, transformer_index)

    def set_model_attn2_replace(self, patch: Any, block_name: str, number: int,
                                transformer_index: int | None = None) -> None:
        self.set_model_patch_replace(patch, "attn2", block_name, number, transformer_index)

    def set_model_attn1_output_patch(self, patch: Callable[..., Any]) -> None:
        self.set_model_patch(patch, "attn1_output_patch")

    def set_model_attn2_output_patch(self, patch: Callable[..., Any]) -> None:
        self.set_model_patch(patch, "attn2_output_patch")

    def set_model_input_block_patch(self, patch: Callable[..., Any]) -> None:
        self.set_model_patch(patch, "input_block_patch")

    def set_model_input_block_patch_after_skip(self, patch: Callable[..., Any]) -> None:
        self.set_model_patch(patch, "input_block_patch_after_skip")

    def set_model_output_block_patch(self, patch: Callable[..., Any]) -> None:
        self.set_model_patch(patch, "output_block_patch")

    def set_model_forward_timestep_embed_patch(self, patch: Any) -> None:
        self.set_model_patch(patch, "forward_timestep_embed_patch")

    def set_model_double_block_patch(self, patch: Any) -> None:
        self.set_model_patch(patch, "double_block")

    def set_model_post_input_patch(self, patch: Any) -> None:
        self.set_model_patch(patch, "post_input")

    def set_model_emb_patch(self, patch: Any) -> None:
        self.set_model_patch(patch, "emb_patch")

    def set_model_compute_dtype(self, dtype: torch.dtype) -> None:
        raise UnsupportedPatchError(f"ModelPatcher.set_model_compute_dtype({dtype}): Loom runs "
                                    f"the UNet in the dtype its device policy chose")

    def add_wrapper(self, wrapper_type: str, wrapper: Callable[..., Any]) -> None:
        self.wrappers.setdefault(wrapper_type, []).append(wrapper)

    def add_callback(self, call_type: str, callback: Callable[..., Any]) -> None:
        self.callbacks.setdefault(call_type, []).append(callback)

    def set_attachments(self, key: str, attachment: Any) -> None:
        self.attachments[key] = attachment

    def get_attachment(self, key: str) -> Any:
        return self.attachments.get(key)

    def set_additional_models(self, key: str, models: list[Any]) -> None:
        self.additional_models[key] = models

    # -- lifetime (Loom's model manager does this) -----------------------------------------
    def unpatch_model(self, device_to: Any = None, unpatch_weights: bool = True) -> None:
        return None

    def model_patches_to(self, device: Any) -> None:
        return None

    def current_loaded_device(self) -> Any:
        return self.handle.device

    # -- back to Loom ---------------------------------------------------------------------
    def unsupported_patches(self) -> list[str]:
        """Patches on this clone outside model_options that Loom cannot apply (named)."""
        found = [f"wrapper:{name}" for name, items in self.wrappers.items() if items]
        found += [f"callback:{name}" for name, items in self.callbacks.items() if items]
        found += [f"object patch {name}" for name in self.object_patches
                  if name != "model_sampling"]
        return found

    def loom_value(self) -> ModelHandle:
        """The Loom MODEL this stands for: its model_options as the handle's typed patches
        (loom_model_options.py); a patch Loom has no place for is an error naming it."""
        unsupported = self.unsupported_patches()
        if unsupported:
            raise UnsupportedPatchError(
                f"this MODEL carries ComfyUI model patches Loom cannot apply: "
                f"{', '.join(unsupported)}; remove the node that adds them, or use Loom's "
                f"built-in node for the same effect")
        handle = self.handle.patching(lambda base: translate(self.model_options, base))
        if self.patches:
            handle = handle.replace(patches=handle.patches + (pack_weight_patch(self.patches),))
        sampling = self.object_patches.get("model_sampling")
        return handle if sampling is None else handle.replace(sampling=sampling)

    def patch_model(self, device_to: Any = None, lowvram_model_memory: int = 0,
                    load_weights: bool = True, force_patch_weights: bool = False) -> Any:
        self.loom_value()  # refuses what cannot be applied
        return self.handle.unet


def _copy_options(options: dict[str, Any]) -> dict[str, Any]:
    """model_options copied as ComfyUI's clone does: nested dicts and lists copied, callables
    and tensors shared."""
    if isinstance(options, dict):
        return {key: _copy_options(value) for key, value in options.items()}
    if isinstance(options, list):
        return [_copy_options(value) for value in options]
    return options


def _unchanged(weight: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """ComfyUI's convert_func for a weight stored as it is used."""
    return weight
