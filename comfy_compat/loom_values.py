"""How values cross between Loom's nodes and ComfyUI-protocol nodes: a classic or V3 node
receives MODEL, CLIP and VAE as ComfyUI's objects (ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE)
and what it returns (those, and a GUIDER or SAMPLER made with comfy.samplers' CFGGuider or
Sampler) becomes Loom's values again. The facade object a Loom value came from is
remembered while something holds it, so a pack's MODEL reaches the next pack node with its
model_options intact (held weakly both ways: a remembered facade never keeps a model alive)."""

from __future__ import annotations

import weakref
from typing import Any

from comfy.model_patcher import ModelPatcher
from comfy.samplers import CFGGuider, Sampler
from comfy.sd import CLIP, VAE

from engine.diffusion.networks.vae_model import VAE as LoomVAE
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.text.encoding import TextEncoderStack

# CFGGuider and Sampler: a pack's own GUIDER and SAMPLER objects
FACADES: tuple[type, ...] = (ModelPatcher, CLIP, VAE, CFGGuider, Sampler)


class ValueBridge:
    """Converts node inputs for packs (`to_pack`) and pack outputs for Loom (`from_pack`)."""

    def __init__(self) -> None:
        self._facade_of: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    def to_pack(self, value: Any) -> Any:
        if isinstance(value, (ModelHandle, TextEncoderStack, LoomVAE)):
            known = self._facade_of.get(value)
            facade = known() if known is not None else None
            return facade if facade is not None else self._wrap(value)
        if isinstance(value, list) and value and isinstance(
                value[0], (ModelHandle, TextEncoderStack, LoomVAE)):
            return [self.to_pack(item) for item in value]
        return value

    def from_pack(self, value: Any) -> Any:
        if isinstance(value, FACADES):
            loom = value.loom_value()
            self._facade_of[loom] = weakref.ref(value)
            return loom
        if isinstance(value, list) and value and isinstance(value[0], FACADES):
            return [self.from_pack(item) for item in value]
        return value

    @staticmethod
    def _wrap(value: Any) -> Any:
        if isinstance(value, ModelHandle):
            return ModelPatcher(value)
        if isinstance(value, TextEncoderStack):
            return CLIP(stack=value)
        return VAE(vae=value)
