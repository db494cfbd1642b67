"""Loading GLIGEN files (networks/gligen.py has the layout): the fusers of every transformer
block, in UNet order, and the position net. The architecture is read from the shapes; the
fusers' head count follows GLIGEN's rule (8 heads at the SD1 width 768, else 64-wide heads),
except in Loom's tiny test files, which record theirs in the safetensors metadata."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.diffusion.checkpoints.detect import UNET_PREFIX
from engine.diffusion.checkpoints.loader import assign_weights
from engine.diffusion.checkpoints.state_files import CheckpointError, StateFile
from engine.diffusion.memory.devices import DevicePolicy
from engine.diffusion.networks.gligen import Gligen, GligenConfig, Position, fuser_heads
from engine.diffusion.networks.unet_patches import TokensPatch

FUSER = ".fuser."
POSITION_PREFIX = "position_net."
HEADS_METADATA_KEY = "loom.gligen_heads"  # JSON list, one per fuser (tiny test files)
SECTIONS = ("input_blocks", "middle_block", "output_blocks")
_BLOCK = re.compile(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.(.*)")


@dataclass(frozen=True, eq=False)
class GligenModel:
    """The GLIGEN value GLIGENLoader gives: the network and the file's name."""

    module: Gligen
    name: str = ""

    def middle_patch(self, positions: Sequence[Position], latent_shape: Sequence[int],
                     device: torch.device) -> TokensPatch:
        """The UNet patch grounding a latent of `latent_shape` in these boxes."""
        return self.module.middle_patch(positions, latent_shape, device)

    def __loom_digest__(self) -> None:
        """Not content-hashable: downstream cache keys use the loader's key instead."""
        return None

    def __loom_nbytes__(self) -> int:
        """Weights are accounted by the model manager, not the output cache."""
        return 0


def _block_order(block: str) -> tuple[int, int, str]:
    """Sort key putting fuser blocks in the UNet's transformer order."""
    match = _BLOCK.fullmatch(block)
    if match is None:
        raise CheckpointError(f"GLIGEN fuser under {block!r} is in no input_blocks / "
                              "middle_block / output_blocks entry; the file is not a GLIGEN "
                              "model for an SD UNet")
    return SECTIONS.index(match.group(1)), int(match.group(2)), match.group(3)


def split_gligen_state(tensors: Mapping[str, Tensor], source: str
                       ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
    """(per fuser in UNet order: its tensors; the position net's tensors), names relative."""
    fusers: dict[str, dict[str, Tensor]] = {}
    position: dict[str, Tensor] = {}
    for key, value in tensors.items():
        name = key.removeprefix(UNET_PREFIX)
        if FUSER in name:
            block, leaf = name.split(FUSER, 1)
            fusers.setdefault(block, {})[leaf] = value
        elif name.startswith(POSITION_PREFIX):
            position[name.removeprefix(POSITION_PREFIX)] = value
    if not fusers or not position:
        raise CheckpointError(
            f"{source} is not a GLIGEN model: it needs '*.transformer_blocks.N.fuser.*' and "
            f"'position_net.*' tensors, found {len(fusers)} fuser blocks and {len(position)} "
            "position-net tensors; put GLIGEN files (e.g. gligen_sd14_textbox_pruned."
            "safetensors) in models/gligen")
    ordered = [fusers[block] for block in sorted(fusers, key=_block_order)]
    return ordered, position


def _shape(tensors: Mapping[str, Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in tensors:
        raise CheckpointError(f"{source}: the GLIGEN weights have no {key!r}; the file is "
                              "incomplete or of another GLIGEN variant")
    return tuple(tensors[key].shape)


def gligen_config(fusers: list[dict[str, Tensor]], position: Mapping[str, Tensor],
                  metadata: Mapping[str, str], source: str) -> GligenConfig:
    """The architecture of a split GLIGEN state (heads: recorded, else GLIGEN's rule)."""
    linears = [_shape(fuser, "linear.weight", source) for fuser in fusers]
    query_dims = tuple(shape[0] for shape in linears)
    key_dim = linears[0][1]
    recorded = metadata.get(HEADS_METADATA_KEY)
    heads = (tuple(json.loads(recorded)) if recorded
             else tuple(fuser_heads(width, key_dim)[0] for width in query_dims))
    phrase_dim = _shape(position, "null_positive_feature", source)[0]
    return GligenConfig(query_dims, key_dim, phrase_dim, heads)


def load_gligen(opened: StateFile, policy: DevicePolicy) -> GligenModel:
    """GLIGENLoader: a GLIGEN file's network in the UNet dtype, on the offload device."""
    source = opened.path.name
    fusers, position = split_gligen_state(opened.tensors, source)
    config = gligen_config(fusers, position, opened.metadata, source)
    weights = {f"fusers.{index}.{leaf}": value for index, fuser in enumerate(fusers)
               for leaf, value in fuser.items()}
    weights.update({f"position_net.{leaf}": value for leaf, value in position.items()})
    with torch.device("meta"):
        network = Gligen(config)
    assign_weights(network, weights, policy.unet_dtype, policy.offload_device, source)
    return GligenModel(network, source)
