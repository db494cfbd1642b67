"""ComfyUI's `comfy_extras.nodes_custom_sampler`: its nodes are Loom's (see the package), and
the NOISE classes packs construct directly."""

from __future__ import annotations

from typing import Any

from loom_internals import node_module_attribute

from engine.diffusion.sampling.ksampler import DisabledNoise, RandomNoise

Noise_RandomNoise = RandomNoise
Noise_EmptyNoise = DisabledNoise


def __getattr__(name: str) -> Any:
    return node_module_attribute(__name__, name)
