"""CLIP vision tower (ViT-L/14, ViT-H/14, ViT-bigG/14) in HuggingFace
`CLIPVisionModelWithProjection` naming, plus ComfyUI's image preprocessing for it.

Radford et al. 2021 (CLIP), Dosovitskiy et al. 2021 (ViT): patches plus a class token go
through a pre-norm transformer; the image embedding is the post-normed class token projected.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.diffusion.memory.offload import compute_device
from engine.diffusion.networks.clip_text import (
    ClipAttention,
    ClipMlp,
    Embedding,
    Fp32LayerNorm,
    TextEncoderConfig,
    multihead_attention,
    run_layers,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_MODES = ("center", "none")
# Released towers all use 16 heads: ViT-L/14 (1024 wide), ViT-H/14 (1280), ViT-bigG/14 (1664).
KNOWN_HEADS = {1024: 16, 1280: 16, 1664: 16}
OPENAI_VIT_L_WIDTH = 1024  # OpenAI's ViT-L uses quick_gelu; the OpenCLIP H/bigG use gelu
PREFIX = "vision_model."
PROJECTION_KEY = "visual_projection.weight"
_LAYER_KEY = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class VisionConfig:
    """Shape of a CLIP vision transformer."""

    width: int
    layers: int
    heads: int
    mlp_width: int
    patch_size: int
    image_size: int
    projection_dim: int
    activation: str
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}; use a size the patches tile exactly")
        self.layer_config()  # checks heads and activation

    @property
    def positions(self) -> int:
        """Patch tokens plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    def layer_config(self) -> TextEncoderConfig:
        """The encoder-layer shape, in the form the shared CLIP layer blocks take."""
        return TextEncoderConfig(width=self.width, layers=self.layers, heads=self.heads,
                                 mlp_width=self.mlp_width, activation=self.activation,
                                 norm_eps=self.norm_eps)


@dataclass(frozen=True)
class ClipVisionOutput:
    """CLIP_VISION_OUTPUT; also subscriptable (`out["image_embeds"]`) as custom nodes expect."""

    image_embeds: Tensor  # (B, projection_dim)
    last_hidden_state: Tensor  # (B, positions, width), before post_layernorm
    penultimate_hidden_states: Tensor  # (B, positions, width), output of layer -2
    mm_projected: Tensor | None = None

    def __getitem__(self, key: str) -> Any:
        if key not in {f.name for f in fields(self)}:
            raise KeyError(f"CLIP_VISION_OUTPUT has no {key!r}; it has image_embeds, "
                           "last_hidden_state, penultimate_hidden_states, mm_projected")
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


class VisionAttention(ClipAttention):
    """CLIP attention without the causal mask: every patch sees every other."""

    def forward(self, x: Tensor) -> Tensor:
        out = multihead_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads,
                                  causal=False)
        return self.out_proj(out)


class VisionLayer(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.layer_norm1 = Fp32LayerNorm(config.width, eps=config.norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = Fp32LayerNorm(config.width, eps=config.norm_eps)
        self.mlp = ClipMlp(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.layers))


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(config.width))
        self.patch_embedding = nn.Conv2d(3, config.width, config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = Embedding(config.positions, config.width)

    def forward(self, pixels: Tensor) -> Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, N, width)
        cls = self.class_embedding.view(1, 1, -1).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, N+1, w)


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        layer_config = config.layer_config()
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm = Fp32LayerNorm(config.width, eps=config.norm_eps)  # sic, HF's key
        self.encoder = VisionEncoder(layer_config)
        self.post_layernorm = Fp32LayerNorm(config.width, eps=config.norm_eps)


class ClipVisionModel(nn.Module):
    """The vision tower with its projection; state-dict keys equal HF's."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config)
        self.visual_projection = nn.Linear(config.width, config.projection_dim, bias=False)

    def forward(self, pixels: Tensor) -> ClipVisionOutput:
        """Normalised (B, 3, image_size, image_size) pixels -> embeddings and hidden states."""
        tower = self.vision_model
        x = tower.pre_layrnorm(tower.embeddings(pixels.to(self.visual_projection.weight.dtype)))
        last, penultimate = run_layers(x, tower.encoder.layers, -2)
        pooled = tower.post_layernorm(last[:, 0])  # (B, width) class token
        return ClipVisionOutput(self.visual_projection(pooled), last, penultimate)

    def encode_image(self, image: Tensor, crop: str = "center") -> ClipVisionOutput:
        """A ComfyUI IMAGE (B, H, W, C) in [0, 1] -> CLIP_VISION_OUTPUT in float32."""
        pixels = clip_preprocess(image.to(compute_device(self)), self.config.image_size, crop)
        with torch.inference_mode():
            out = self(pixels)
        return ClipVisionOutput(out.image_embeds.float(), out.last_hidden_state.float(),
                                out.penultimate_hidden_states.float())


def clip_preprocess(image: Tensor, size: int, crop: str = "center") -> Tensor:
    """ComfyUI's CLIP preprocessing: IMAGE (B, H, W, C) -> normalised (B, 3, size, size).

    "center" scales the shorter side to `size` (bicubic, antialiased) and crops the middle;
    "none" resizes straight to size x size. Pixels are then rounded to 8-bit steps."""
    if crop not in CROP_MODES:
        raise ValueError(f"crop {crop!r} is not one of {CROP_MODES}")
    if image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"expected an IMAGE of shape (B, H, W, 3), got {tuple(image.shape)}")
    pixels = image[..., :3].movedim(-1, 1).float()  # (B, 3, H, W)
    height, width = pixels.shape[2:]
    if (height, width) != (size, size):
        pixels = _resize(pixels, size) if crop == "center" else F.interpolate(
            pixels, size=(size, size), mode="bicubic", antialias=True)
    pixels = torch.clamp(pixels * 255.0, 0, 255).round() / 255.0
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def _resize(pixels: Tensor, size: int) -> Tensor:
    """Shorter side to `size`, then the centred size x size window."""
    height, width = pixels.shape[2:]
    scale = size / min(height, width)
    pixels = F.interpolate(pixels, size=(round(scale * height), round(scale * width)),
                           mode="bicubic", antialias=True)
    top = (pixels.shape[2] - size) // 2
    left = (pixels.shape[3] - size) // 2
    return pixels[:, :, top:top + size, left:left + size]


def detect_vision_config(state: Mapping[str, Tensor]) -> VisionConfig:
    """The tower's shape from its weights (HF CLIPVisionModelWithProjection keys)."""
    embed = PREFIX + "embeddings."
    required = (embed + "class_embedding", embed + "patch_embedding.weight",
                embed + "position_embedding.weight", PROJECTION_KEY,
                PREFIX + "encoder.layers.0.mlp.fc1.weight")
    missing = [key for key in required if key not in state]
    if missing:
        raise ValueError(f"not a CLIP vision model in HF naming: missing {missing}; Loom reads "
                         "CLIPVisionModelWithProjection files (e.g. clip_vision_h.safetensors)")
    width = state[embed + "class_embedding"].shape[0]
    patch = state[embed + "patch_embedding.weight"].shape[-1]
    grid = math.isqrt(state[embed + "position_embedding.weight"].shape[0] - 1)
    layers = 1 + max((int(m.group(1)) for key in state if (m := _LAYER_KEY.match(key))),
                     default=-1)
    mlp_width = state[PREFIX + "encoder.layers.0.mlp.fc1.weight"].shape[0]
    heads = KNOWN_HEADS.get(width, max(1, width // 64))  # 64-wide heads otherwise
    return VisionConfig(width=width, layers=layers, heads=heads,
                        mlp_width=mlp_width, patch_size=patch, image_size=grid * patch,
                        projection_dim=state[PROJECTION_KEY].shape[0],
                        activation="quick_gelu" if width == OPENAI_VIT_L_WIDTH else "gelu")


def load_clip_vision(state: Mapping[str, Tensor], dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> ClipVisionModel:
    """A CLIP vision model from its state dict (extra buffers such as position_ids dropped)."""
    config = detect_vision_config(state)
    model = ClipVisionModel(config)
    wanted = model.state_dict().keys()
    model.load_state_dict({key: state[key] for key in wanted if key in state}, strict=True)
    return model.to(device=device, dtype=dtype).eval()
