"""The parts ControlNet-Union (xinsir's "ControlNet++", SDXL) adds to a ControlNet: one model
trained on several control types, told which one the hint is.

Weights (diffusers names, as the released files and ComfyUI keep them; N control types, W the
ControlNet's model_channels, 320 in the released model):

* `task_embedding` (N, W): a learned vector per control type;
* `transformer_layes.0` (sic): one pre-LayerNorm transformer block of width W, 8 heads
  (`attn.in_proj_weight` (3W, W) holding q, k, v; `attn.out_proj`; `ln_1`; `mlp.c_fc`/`c_proj`,
  4x wide, QuickGELU; `ln_2`);
* `spatial_ch_projs` (W -> W): the fused token -> a per-channel bias of the hint features;
* `control_add_embedding.linear_1/2` (256 N -> time_embed_dim -> time_embed_dim).

Behaviour (ComfyUI's, which uses only the first selected type):

* the time embedding gets `linear_2(silu(linear_1(concat_k sinusoid_256(c_k))))`, c the
  N-entry multi-hot type vector (all zero when no type is set: "auto");
* with a type t, the hint features h = input_hint_block(hint) become
  h + spatial_ch_projs(T(mean_xy(h) + task_embedding[t])), T the transformer over the single
  token; "auto" leaves h as it is.

The type names and numbers are ComfyUI's (comfy/cldm/control_types.py)."""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.diffusion.networks.unet import timestep_embedding

# ComfyUI's SetUnionControlNetType choices (after "auto") and their type numbers.
UNION_TYPES = MappingProxyType({
    "openpose": 0, "depth": 1, "hed/pidi/scribble/ted": 2,
    "canny/lineart/anime_lineart/mlsd": 3, "normal": 4, "segment": 5, "tile": 6,
    "repaint": 7})
TYPE_EMBED_DIM = 256  # the sinusoid width per control type
HEADS = 8


class FusionAttention(nn.Module):
    """Multi-head self-attention with q, k, v stacked in one projection (`in_proj_weight`)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        heads = [t.reshape(batch, tokens, HEADS, width // HEADS).transpose(1, 2)
                 for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*heads)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


class FusionBlock(nn.Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(x)) (CLIP-style residual block, QuickGELU)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = FusionAttention(width)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(width, 4 * width),
                                  "c_proj": nn.Linear(4 * width, width)})
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        hidden = self.mlp["c_fc"](self.ln_2(x))
        return x + self.mlp["c_proj"](hidden * torch.sigmoid(1.702 * hidden))


class ControlTypeEmbedding(nn.Module):
    """`control_add_embedding`: the multi-hot control-type vector -> a time-embedding term."""

    def __init__(self, types: int, out_features: int) -> None:
        super().__init__()
        self.types = types
        self.linear_1 = nn.Linear(TYPE_EMBED_DIM * types, out_features)
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, selected: Sequence[int], dtype: torch.dtype, device: torch.device
                ) -> Tensor:
        """(1, out_features) for the selected type numbers (none: all zero)."""
        hot = torch.zeros(self.types, device=device)
        hot[list(selected)] = 1.0
        flat = timestep_embedding(hot, TYPE_EMBED_DIM).reshape(1, -1).to(dtype)
        return self.linear_2(F.silu(self.linear_1(flat)))


def check_types(selected: Sequence[int], types: int, name: str) -> None:
    """A clear error when a selected type number is past this model's N types."""
    for number in selected:
        if not 0 <= number < types:
            labels = [label for label, value in UNION_TYPES.items() if value < types]
            raise ValueError(
                f"control type {number} was selected but the union ControlNet {name!r} knows "
                f"{types} types ({', '.join(labels)}); pick one of those in "
                "SetUnionControlNetType")


def fuse_hint(hint_features: Tensor, token: Tensor, block: FusionBlock, project: nn.Linear
              ) -> Tensor:
    """h + spatial_ch_projs(T(mean_xy(h) + task vector)): `token` is the task vector (W,)."""
    sequence = (hint_features.mean(dim=(2, 3)) + token)[:, None]  # (B, 1, W)
    alpha = project(block(sequence)[:, 0])
    return hint_features + alpha[:, :, None, None]
