"""GLIGEN (Li et al. 2023, "GLIGEN: Open-Set Grounded Text-to-Image Generation"): boxes with a
phrase each become grounding tokens, and a gated self-attention layer in every transformer
block of the UNet lets the image tokens attend to them.

* Position net: each box (x1, y1, x2, y2 in 0..1) gets a Fourier embedding (8 frequencies
  100 ** (k / 8), sin and cos of each coordinate: 64 numbers), is joined to its phrase's
  embedding (the CLIP text tower's pooled output, unprojected) and goes through an MLP
  (in + 64 -> 512 -> 512 -> out, SiLU between). Up to 30 boxes; the unused slots carry the
  learned null phrase / null position features instead.
* Gated self-attention ("fuser", one per SpatialTransformer, run between the block's self- and
  cross-attention): the tokens are projected to the image width, self-attention runs over
  [image tokens, grounding tokens] and only the image tokens' outputs are kept;
  x += tanh(alpha_attn) * that, then x += tanh(alpha_dense) * GEGLU-MLP(LayerNorm(x)).

Checkpoint keys (the original GLIGEN `model` state dict; ComfyUI's pruned files keep only these
parts): `{input_blocks.N.1 | middle_block.1 | output_blocks.N.1}.transformer_blocks.0.fuser.*`
(`linear`, `attn.to_q/k/v`, `attn.to_out.0`, `ff.net.0.proj`, `ff.net.2`, `norm1`, `norm2`,
`alpha_attn`, `alpha_dense`) and `position_net.{linears.0,2,4, null_positive_feature,
null_position_feature}`, optionally under `model.diffusion_model.`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.diffusion.networks.attention import CrossAttention, FeedForward
from engine.diffusion.networks.unet_patches import TokensPatch, TransformerOptions

FOURIER_FREQUENCIES = 8
FOURIER_TEMPERATURE = 100.0
BOX_COORDINATES = 4  # x1, y1, x2, y2
POSITION_DIM = FOURIER_FREQUENCIES * 2 * BOX_COORDINATES  # sin and cos of each coordinate
POSITION_HIDDEN = 512
MAX_OBJECTS = 30  # grounding tokens per image; unused slots hold the null features
SD1_KEY_DIM = 768  # GLIGEN's rule: SD1 fusers have 8 heads, any other width 64-wide heads
SD1_HEADS = 8
HEAD_WIDTH = 64

# (phrase embedding (1, in_dim), height, width, y, x): the box in latent cells (ComfyUI's tuple)
Position = tuple[Tensor, int, int, int, int]


def fourier_embedding(boxes: Tensor) -> Tensor:
    """(..., 4) box coordinates -> (..., 64): [sin(f0 b), cos(f0 b), sin(f1 b), ...] for the
    frequencies f_k = 100 ** (k / 8), each sin/cos over the 4 coordinates."""
    bands = FOURIER_TEMPERATURE ** (torch.arange(FOURIER_FREQUENCIES, device=boxes.device)
                                    / FOURIER_FREQUENCIES)
    args = boxes[..., None, :] * bands[:, None].to(boxes.dtype)  # (..., F, 4)
    return torch.stack([args.sin(), args.cos()], dim=-2).flatten(-3)  # (..., F * 2 * 4)


class PositionNet(nn.Module):
    """Boxes and phrase embeddings -> grounding tokens (module docstring); keys `linears.{0,2,4}`
    (SiLU in the odd slots), `null_positive_feature`, `null_position_feature`."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linears = nn.ModuleDict({
            "0": nn.Linear(in_dim + POSITION_DIM, POSITION_HIDDEN),
            "2": nn.Linear(POSITION_HIDDEN, POSITION_HIDDEN),
            "4": nn.Linear(POSITION_HIDDEN, out_dim)})
        self.null_positive_feature = nn.Parameter(torch.zeros(in_dim))
        self.null_position_feature = nn.Parameter(torch.zeros(POSITION_DIM))

    @property
    def in_dim(self) -> int:
        return self.null_positive_feature.shape[0]

    def forward(self, boxes: Tensor, masks: Tensor, phrases: Tensor) -> Tensor:
        """boxes (B, N, 4), masks (B, N) 1 = a real box, phrases (B, N, in_dim) -> (B, N, out),
        computed in float32 whatever the weights' dtype (as ComfyUI's cast-on-use layers)."""
        masks = masks.float().unsqueeze(-1)
        null_phrase = self.null_positive_feature.float().view(1, 1, -1)
        null_position = self.null_position_feature.float().view(1, 1, -1)
        phrases = phrases.float() * masks + (1 - masks) * null_phrase
        positions = fourier_embedding(boxes.float()) * masks + (1 - masks) * null_position
        h = F.silu(self._dense("0", torch.cat([phrases, positions], dim=-1)))
        return self._dense("4", F.silu(self._dense("2", h)))

    def _dense(self, slot: str, h: Tensor) -> Tensor:
        layer = self.linears[slot]
        return F.linear(h, layer.weight.float(), layer.bias.float())


class GatedSelfAttention(nn.Module):
    """One fuser: image tokens attend over themselves and the grounding tokens, gated by
    tanh(alpha) (zero-initialised in training, so an untrained fuser changes nothing)."""

    def __init__(self, query_dim: int, key_dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.linear = nn.Linear(key_dim, query_dim)
        self.attn = CrossAttention(query_dim, query_dim, heads, dim_head)
        self.ff = FeedForward(query_dim)
        self.norm1 = nn.LayerNorm(query_dim)
        self.norm2 = nn.LayerNorm(query_dim)
        self.alpha_attn = nn.Parameter(torch.tensor(0.0))
        self.alpha_dense = nn.Parameter(torch.tensor(0.0))

    @property
    def query_dim(self) -> int:
        return self.linear.out_features

    def forward(self, x: Tensor, objects: Tensor) -> Tensor:
        """x (B, T, query_dim) image tokens, objects (B, N, key_dim) -> x (B, T, query_dim)."""
        visual = x.shape[1]
        tokens = torch.cat([x, self.linear(objects)], dim=1)  # (B, T + N, query_dim)
        x = x + torch.tanh(self.alpha_attn) * self.attn(self.norm1(tokens))[:, :visual]
        return x + torch.tanh(self.alpha_dense) * self.ff(self.norm2(x))


def fuser_heads(query_dim: int, key_dim: int) -> tuple[int, int]:
    """(heads, dim_head) of a fuser, by GLIGEN's rule (module constants)."""
    if key_dim == SD1_KEY_DIM:
        return SD1_HEADS, query_dim // SD1_HEADS
    return query_dim // HEAD_WIDTH, HEAD_WIDTH


@dataclass(frozen=True)
class GligenConfig:
    """The fusers' widths (one per SpatialTransformer, in UNet order), the grounding token width
    (`key_dim`, the UNet's context width), the phrase width and the fusers' head count."""

    query_dims: tuple[int, ...]
    key_dim: int
    phrase_dim: int
    heads: tuple[int, ...]


class Gligen(nn.Module):
    """The GLIGEN value: fusers in UNet transformer order and the position net. Calling it runs
    one fuser (so the model manager sees the use and loads the weights first)."""

    def __init__(self, config: GligenConfig) -> None:
        super().__init__()
        self.config = config
        self.fusers = nn.ModuleList(
            GatedSelfAttention(width, config.key_dim, heads, width // heads)
            for width, heads in zip(config.query_dims, config.heads, strict=True))
        self.position_net = PositionNet(config.phrase_dim, config.key_dim)

    def forward(self, x: Tensor, objects: Tensor, index: int) -> Tensor:
        return self.fusers[index](x, objects)

    def grounding_tokens(self, positions: Sequence[Position], latent_shape: Sequence[int],
                         device: torch.device) -> Tensor:
        """(B, 30, key_dim) tokens for boxes given in latent cells of a (B, C, H, W) latent."""
        batch, height, width = latent_shape[0], latent_shape[2], latent_shape[3]
        if len(positions) > MAX_OBJECTS:
            raise ValueError(f"{len(positions)} GLIGEN boxes were given but the model takes at "
                             f"most {MAX_OBJECTS}; use fewer GLIGENTextBoxApply nodes")
        boxes = torch.zeros(MAX_OBJECTS, BOX_COORDINATES)
        masks = torch.zeros(MAX_OBJECTS)
        phrases = torch.zeros(MAX_OBJECTS, self.config.phrase_dim)
        for slot, (phrase, box_height, box_width, top, left) in enumerate(positions):
            boxes[slot] = torch.tensor((left / width, top / height, (left + box_width) / width,
                                        (top + box_height) / height))
            masks[slot] = 1.0
            phrases[slot] = self._phrase(phrase)
        return self.position_net(boxes.expand(batch, -1, -1).to(device),
                                 masks.expand(batch, -1).to(device),
                                 phrases.expand(batch, -1, -1).to(device))

    def _phrase(self, phrase: Tensor) -> Tensor:
        flat = phrase.detach().reshape(-1).float().cpu()
        if flat.numel() != self.config.phrase_dim:
            raise ValueError(f"a GLIGEN box phrase embedding has {flat.numel()} numbers but this "
                             f"GLIGEN model takes {self.config.phrase_dim}; encode the box text "
                             "with the CLIP of the model the GLIGEN file was made for")
        return flat

    def middle_patch(self, positions: Sequence[Position], latent_shape: Sequence[int],
                     device: torch.device) -> TokensPatch:
        """The UNet `middle_patch` that runs fuser `transformer_index` with these boxes' tokens
        (no boxes: every slot null, GLIGEN's empty grounding)."""
        with torch.no_grad():
            objects = self.grounding_tokens(positions, latent_shape, device)

        def patch(x: Tensor, options: TransformerOptions) -> Tensor:
            index = options["transformer_index"]
            self._check_fits(index, x)
            with torch.no_grad():
                return self(x, objects.to(device=x.device, dtype=x.dtype), index)

        return patch

    def _check_fits(self, index: int, x: Tensor) -> None:
        fusers = len(self.fusers)
        if index >= fusers or x.shape[-1] != self.fusers[index].query_dim:
            raise ValueError(
                f"this GLIGEN model has {fusers} fusers for attention widths "
                f"{list(self.config.query_dims)}, but the UNet's transformer {index} is "
                f"{x.shape[-1]} wide; use GLIGEN with the SD model family it was made for")
