"""Random ControlNet and T2I-Adapter files in the released layouts, for tests and demos.

A full-size SD1.5 ControlNet has exactly the key/dtype/shape set of the lllyasviel files
(shared/formats/controlnet_sd15.tsv); `tiny` ones match the tiny checkpoints' UNets
(writer.unet_config) and record their config in the safetensors metadata. Every
weight is random, zero convs included, so no residual is trivially zero. ControlNet-Union
(SDXL "ControlNet++") files are written as released: diffusers layout, with the union parts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from engine.diffusion.checkpoints.controlnet_diffusers import original_to_diffusers
from engine.diffusion.checkpoints.controlnet_loader import CONTROL_PREFIX
from engine.diffusion.checkpoints.writer import RECIPES, randomize, unet_config, write_tensors
from engine.diffusion.networks.controlnet import CONFIG_METADATA_KEY, ControlNet, ControlNetConfig
from engine.diffusion.networks.t2i_adapter import AdapterConfig, build_adapter

CONTROLNET_KINDS = ("sd15", "sd21v", "sdxl_base")  # checkpoint kinds a ControlNet is made for
ADAPTER_KINDS = ("full", "full_xl", "light")
TINY_ADAPTER_WIDTH = 32  # the tiny UNets' model_channels


UNION_RELEASED_TYPES = 8  # xinsir's controlnet-union-sdxl-1.0 "promax" (the first had 6)


def controlnet_config(kind: str = "sd15", *, tiny: bool = True, union_types: int = 0
                      ) -> ControlNetConfig:
    """The ControlNet architecture for checkpoint `kind` (one of CONTROLNET_KINDS);
    `union_types` > 0: a ControlNet-Union with that many control types."""
    if kind not in CONTROLNET_KINDS:
        raise ValueError(f"no ControlNet layout for checkpoint kind {kind!r}; use one of "
                         f"{CONTROLNET_KINDS}")
    config = ControlNetConfig.for_unet(unet_config(RECIPES[kind], tiny), tiny=tiny)
    return dataclasses.replace(config, union_types=union_types)


def random_controlnet(kind: str = "sd15", *, tiny: bool = True, seed: int = 0,
                      meta: bool = False, union_types: int = 0
                      ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a random original-layout (`control_model.`) fp32 ControlNet.
    With `meta` the tensors are shape-only, for layout checks."""
    config = controlnet_config(kind, tiny=tiny, union_types=union_types)
    with torch.device("meta" if meta else "cpu"):
        network = ControlNet(config)
    if not meta:
        randomize(network, torch.Generator().manual_seed(seed))
    tensors = {CONTROL_PREFIX + name: value for name, value in network.state_dict().items()}
    metadata = {"loom.kind": f"controlnet_{kind}", "loom.size": "tiny" if tiny else "full"}
    if tiny:
        metadata[CONFIG_METADATA_KEY] = config.to_json()
    return tensors, metadata


def write_random_controlnet(path: Path, kind: str = "sd15", *, tiny: bool = True,
                            seed: int = 0) -> Path:
    """Write a random ControlNet for checkpoint `kind` to `path` (.safetensors)."""
    return write_tensors(path, *random_controlnet(kind, tiny=tiny, seed=seed))


def write_random_union_controlnet(path: Path, kind: str = "sdxl_base", *, tiny: bool = True,
                                  seed: int = 0, types: int = UNION_RELEASED_TYPES) -> Path:
    """Write a random ControlNet-Union in the released (diffusers) layout to `path`."""
    tensors, metadata = random_controlnet(kind, tiny=tiny, seed=seed, union_types=types)
    original = {name.removeprefix(CONTROL_PREFIX): value for name, value in tensors.items()}
    metadata["loom.kind"] = f"controlnet_union_{kind}"
    return write_tensors(path, original_to_diffusers(original), metadata)


def adapter_config(kind: str = "full", *, tiny: bool = True, hint_channels: int = 3
                   ) -> AdapterConfig:
    """A released T2I-Adapter architecture (TencentARC's, as ComfyUI builds them), or its
    32-wide tiny version."""
    base = TINY_ADAPTER_WIDTH if tiny else 320
    widths = (base, base * 2, base * 4, base * 4)
    if kind == "light":
        return AdapterConfig("light", hint_channels * 64, widths, 4)
    if kind in ("full", "full_xl"):
        unshuffle = 16 if kind == "full_xl" else 8
        return AdapterConfig("full", hint_channels * unshuffle * unshuffle, widths, 2)
    raise ValueError(f"unknown adapter kind {kind!r}; use one of {ADAPTER_KINDS}")


def random_t2i_adapter(kind: str = "full", *, tiny: bool = True, seed: int = 0,
                       hint_channels: int = 3) -> dict[str, Tensor]:
    """The tensors of a random T2I-Adapter in the original (TencentARC) layout, fp32."""
    adapter = build_adapter(adapter_config(kind, tiny=tiny, hint_channels=hint_channels))
    randomize(adapter, torch.Generator().manual_seed(seed))
    return dict(adapter.state_dict())


def write_random_t2i_adapter(path: Path, kind: str = "full", *, tiny: bool = True,
                             seed: int = 0, hint_channels: int = 3) -> Path:
    tensors = random_t2i_adapter(kind, tiny=tiny, seed=seed, hint_channels=hint_channels)
    return write_tensors(path, tensors, {"loom.kind": f"t2i_adapter_{kind}"})
