"""Loading ControlNet and T2I-Adapter files into CONTROL_NET values, whatever their layout:

* original (`control_model.*`, the lllyasviel .pth layout; also without the prefix, and full
  v1.0 files that carry a whole SD model next to it: only `control_model.` is read);
* diffusers (`controlnet_cond_embedding.*`, `down_blocks.*`, `controlnet_down_blocks.*`),
  ControlNet-Union (SDXL "ControlNet++") included;
* "diff" ControlNets (a top-level `difference` key): their encoder weights are deltas to add to
  the base model's UNet weights, so they need the MODEL (DiffControlNetLoader);
* T2I-Adapters (full, full SDXL and light; original or diffusers layout).

The architecture (SD1/SD2/SDXL, sizes) is read from the shapes; Loom's small test files record
theirs in the safetensors metadata.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from engine.diffusion.checkpoints.controlnet_diffusers import DIFFUSERS_PROBE, diffusers_to_original
from engine.diffusion.checkpoints.detect import component_summary
from engine.diffusion.checkpoints.loader import assign_weights, strip_prefix
from engine.diffusion.checkpoints.safetensors_io import CastOnRead, shapes_of
from engine.diffusion.checkpoints.state_files import CheckpointError, StateFile
from engine.diffusion.memory.cast_on_use import Holding
from engine.diffusion.memory.devices import DevicePolicy
from engine.diffusion.networks.controlnet import (
    CONFIG_METADATA_KEY,
    ControlNet,
    ControlNetConfig,
    detect_config,
)
from engine.diffusion.networks.t2i_adapter import (
    T2IAdapter,
    build_adapter,
    from_diffusers,
    is_adapter,
)
from engine.diffusion.networks.t2i_adapter import detect_config as detect_adapter_config
from engine.diffusion.patches.control import ControlModel
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.patches.patching import patched

CONTROL_PREFIX = "control_model."
ORIGINAL_PROBE = "zero_convs.0.0.weight"
DIFF_MARKER = "difference"
# ComfyUI turns on global average pooling for the shuffle ControlNets by file name.
SHUFFLE_SUFFIXES = ("_shuffle", "_shuffle_fp16")
# key present -> what the file is (control models Loom does not run)
UNSUPPORTED_MARKERS = {
    "lora_controlnet": "a Control-LoRA",
    "controlnet_blocks.0.weight": "an SD3/Flux/HunyuanDiT-style ControlNet",
    "controlnet_x_embedder.weight": "a Flux ControlNet",
    "style_embedding": "a T2I style adapter (load it with StyleModelLoader)",
}


def load_control_model(opened: StateFile, policy: DevicePolicy,
                       base: ModelHandle | None = None) -> ControlModel:
    """The CONTROL_NET value of a ControlNet or T2I-Adapter file; `base` is the MODEL whose
    UNet a diff ControlNet's deltas are added to (DiffControlNetLoader)."""
    tensors, name = opened.tensors, opened.path.name
    if DIFF_MARKER in tensors:  # deltas are added to the base in fp32, then cast
        weights = add_difference(original_weights(tensors, name), base, name)
    else:  # read as held: each converted tensor releases its file pages
        tensors = CastOnRead(tensors, {"": control_holding(policy)})
        if is_adapter(tensors):
            return ControlModel(_load_adapter(tensors, policy, name), name)
        weights = original_weights(tensors, name)
    recorded = opened.metadata.get(CONFIG_METADATA_KEY)
    config = (ControlNetConfig.from_json(recorded) if recorded
              else detect_config(shapes_of(weights)))
    with torch.device("meta"):
        network = ControlNet(config)
    _assign(network, weights, policy, name)
    shuffle = opened.path.stem.lower().endswith(SHUFFLE_SUFFIXES)
    return ControlModel(network, name, global_average_pooling=shuffle)


def original_weights(tensors: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """The ControlNet's tensors under original-layout names without `control_model.`."""
    if CONTROL_PREFIX + ORIGINAL_PROBE in tensors:
        return strip_prefix(tensors, CONTROL_PREFIX)
    if ORIGINAL_PROBE in tensors:
        return {key: value for key, value in tensors.items() if key != DIFF_MARKER}
    if DIFFUSERS_PROBE in tensors:
        return diffusers_to_original(tensors)
    for marker, what in UNSUPPORTED_MARKERS.items():
        if any(key == marker or key.startswith(marker + ".") for key in tensors):
            raise CheckpointError(f"{source} is {what} (it has {marker!r}), which Loom's "
                                  "ControlNetLoader does not load")
    raise CheckpointError(
        f"{source}: could not detect a ControlNet or T2I-Adapter: expected "
        f"'{CONTROL_PREFIX}{ORIGINAL_PROBE}' (original layout), '{DIFFUSERS_PROBE}' (diffusers)"
        f" or 'conv_in.weight'/'body.0.in_conv.weight' (T2I-Adapter); found "
        f"{component_summary(shapes_of(tensors))}")


def add_difference(deltas: Mapping[str, Tensor], base: ModelHandle | None,
                   source: str) -> dict[str, Tensor]:
    """A diff ControlNet's weights: each tensor that the base UNet also has (time_embed,
    input_blocks, middle_block, label_emb) is base + delta, computed in fp32 with the base's
    patches (LoRAs) applied; the ControlNet-only parts are taken as stored."""
    if base is None:
        raise CheckpointError(
            f"{source} is a 'diff' ControlNet (it has a {DIFF_MARKER!r} key): its weights are "
            "differences to a base model's UNet; load it with DiffControlNetLoader and connect "
            "the model it was made for")
    combined = dict(deltas)
    with patched(base.unet, base.patches):
        state = base.unet.state_dict()
        shared = [key for key in deltas if key in state]
        if not shared:
            raise CheckpointError(f"none of {source}'s weights match the UNet of "
                                  f"{base.name!r}; use the model family it was made for")
        for key in shared:
            if tuple(state[key].shape) != tuple(deltas[key].shape):
                raise CheckpointError(
                    f"{source}: {key} is {tuple(deltas[key].shape)} but the model's is "
                    f"{tuple(state[key].shape)}; use the model family it was made for")
            combined[key] = state[key].float() + deltas[key].to(state[key].device).float()
    return combined


def _load_adapter(tensors: Mapping[str, Tensor], policy: DevicePolicy, source: str
                  ) -> T2IAdapter:
    weights = from_diffusers(tensors) if any(key.startswith("adapter.") for key in tensors) \
        else dict(tensors)
    config = detect_adapter_config(shapes_of(weights))
    with torch.device("meta"):
        adapter = build_adapter(config)
    _assign(adapter, weights, policy, source)
    return adapter


def control_holding(policy: DevicePolicy) -> Holding:
    """ControlNets and adapters compute in the UNet's dtype and hold a file dtype that widens
    exactly into it as the UNet does (the UNet's storage flags do not apply to them)."""
    return Holding(policy.unet_dtype, None, policy.unet_holding.file_dtype)


def _assign(module: nn.Module, weights: Mapping[str, Tensor], policy: DevicePolicy,
            source: str) -> None:
    """Give a meta-device module the weights as held (control_holding), on the offload
    device."""
    holding = control_holding(policy)
    held = {name: holding.held(tensor) for name, tensor in weights.items()}
    assign_weights(module, held, None, policy.offload_device, source)
    holding.apply(module)
