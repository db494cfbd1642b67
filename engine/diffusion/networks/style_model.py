"""T2I-Adapter style model (Mou et al. 2023, "T2I-Adapter", the style adapter): learned
query tokens read a CLIP ViT-L/14 image's hidden states through a small transformer and are
projected into the text-conditioning width, to be appended to a prompt's tokens.

Attribute names mirror the released checkpoint's keys, including its `transformer_layes`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from engine.diffusion.memory.offload import compute_device
from engine.diffusion.networks.clip_text import Fp32LayerNorm, quick_gelu
from engine.diffusion.networks.openclip_text import PackedQkvAttention

STYLE_KEY = "style_embedding"
RELEASED_HEADS = 8  # the released t2iadapter_style model; head count is not in the weights
_LAYER_KEY = re.compile(r"^transformer_layes\.(\d+)\.")


@dataclass(frozen=True)
class StyleConfig:
    """Shape of a style adapter: 1024 wide, 3 layers, 8 tokens, 768 out for the release."""

    width: int
    layers: int
    tokens: int
    context_dim: int
    heads: int = RELEASED_HEADS

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"style width {self.width} is not divisible by heads {self.heads}")


class Mlp(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(quick_gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """OpenAI CLIP's pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = PackedQkvAttention(width, heads, causal=False)
        self.ln_1 = Fp32LayerNorm(width)
        self.mlp = Mlp(width)
        self.ln_2 = Fp32LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class StyleAdapter(nn.Module):
    """CLIP vision hidden states (B, P, width) -> style tokens (B, tokens, context_dim)."""

    def __init__(self, config: StyleConfig) -> None:
        super().__init__()
        self.config = config
        self.style_embedding = nn.Parameter(torch.zeros(1, config.tokens, config.width))
        self.ln_pre = Fp32LayerNorm(config.width)
        self.transformer_layes = nn.Sequential(
            *(ResidualAttentionBlock(config.width, config.heads) for _ in range(config.layers)))
        self.ln_post = Fp32LayerNorm(config.width)
        self.proj = nn.Parameter(torch.zeros(config.width, config.context_dim))

    def forward(self, hidden: Tensor) -> Tensor:
        if hidden.ndim != 3 or hidden.shape[-1] != self.config.width:
            raise ValueError(f"style model expects CLIP vision hidden states (B, P, "
                             f"{self.config.width}), got {tuple(hidden.shape)}; use a "
                             f"CLIP ViT-L/14 vision model with this style model")
        queries = self.style_embedding.expand(hidden.shape[0], -1, -1).to(hidden.dtype)
        x = self.ln_pre(torch.cat([hidden, queries], dim=1))  # (B, P + tokens, width)
        x = self.transformer_layes(x)
        x = self.ln_post(x[:, -self.config.tokens:])  # (B, tokens, width)
        return x @ self.proj  # (B, tokens, context_dim)

    def style_tokens(self, hidden: Tensor) -> Tensor:
        """Every image's tokens in one row, as ComfyUI does: (1, B * tokens, context_dim)."""
        with torch.inference_mode():
            tokens = self(hidden.to(device=compute_device(self), dtype=self.proj.dtype))
        return tokens.float().flatten(0, 1).unsqueeze(0)


def detect_style_config(state: Mapping[str, Tensor]) -> StyleConfig:
    """The adapter's shape from its weights."""
    if STYLE_KEY not in state or "proj" not in state:
        hint = " (a Flux Redux model, which Loom does not support yet)" if (
            "redux_down.weight" in state) else ""
        raise ValueError(f"not a T2I-Adapter style model{hint}: it has no {STYLE_KEY!r} and "
                         "'proj' weights; use e.g. t2iadapter_style_sd14v1")
    embedding = state[STYLE_KEY]  # (1, tokens, width)
    layers = 1 + max((int(m.group(1)) for key in state if (m := _LAYER_KEY.match(key))),
                     default=-1)
    return StyleConfig(width=embedding.shape[-1], layers=layers, tokens=embedding.shape[1],
                       context_dim=state["proj"].shape[1])


def load_style_model(state: Mapping[str, Tensor], dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> StyleAdapter:
    """A style adapter from its state dict (every key must match)."""
    model = StyleAdapter(detect_style_config(state))
    model.load_state_dict(dict(state), strict=True)
    return model.to(device=device, dtype=dtype).eval()
