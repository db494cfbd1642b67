"""ComfyUI's `comfy.utils` for custom-node packs: file loading (with Loom's pickle opt-in),
resizing, tiling and ProgressBar, which reports through the running node's progress events."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from engine.comfy_host import HOST, running_node
from engine.diffusion.checkpoints.state_files import open_state_file
from engine.diffusion.networks.tiling import tiled_apply
from nodes import imaging

PROGRESS_BAR_ENABLED = True
MAX_PREVIEW_RESOLUTION = 512


def load_torch_file(ckpt: str, safe_load: bool = False, device: Any = None,
                    return_metadata: bool = False) -> Any:
    """A file's tensors by name. Pickle files (.ckpt/.pt/.bin/.pth) load only when Loom was
    started with --allow-pickle-checkpoints, and then with torch.load(weights_only=True)."""
    services = HOST.require_services("comfy.utils.load_torch_file")
    allow_pickle = bool(getattr(services.model_manager, "allow_pickle", False))
    opened = open_state_file(Path(ckpt), allow_pickle=allow_pickle)
    tensors = dict(opened.tensors)
    if device is not None:
        tensors = {name: t.to(device) for name, t in tensors.items()}
    return (tensors, dict(opened.metadata)) if return_metadata else tensors


def save_torch_file(sd: Mapping[str, torch.Tensor], ckpt: str,
                    metadata: Mapping[str, str] | None = None) -> None:
    save_file({k: v.contiguous() for k, v in sd.items()}, ckpt,
              metadata=dict(metadata) if metadata else None)


def calculate_parameters(sd: Mapping[str, torch.Tensor], prefix: str = "") -> int:
    return sum(t.nelement() for k, t in sd.items() if k.startswith(prefix))


def weight_dtype(sd: Mapping[str, torch.Tensor], prefix: str = "") -> torch.dtype | None:
    counts: dict[torch.dtype, int] = {}
    for key, tensor in sd.items():
        if key.startswith(prefix):
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.nelement()
    return max(counts, key=counts.__getitem__) if counts else None


def state_dict_key_replace(state_dict: dict[str, Any], keys_to_replace: Mapping[str, str]
                           ) -> dict[str, Any]:
    for old, new in keys_to_replace.items():
        if old in state_dict:
            state_dict[new] = state_dict.pop(old)
    return state_dict


def state_dict_prefix_replace(state_dict: dict[str, Any], replace_prefix: Mapping[str, str],
                              filter_keys: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {} if filter_keys else state_dict
    for old, new in replace_prefix.items():
        for key in [k for k in state_dict if k.startswith(old)]:
            out[new + key[len(old):]] = state_dict.pop(key) if not filter_keys else state_dict[key]
    return out


def repeat_to_batch_size(tensor: torch.Tensor, batch_size: int, dim: int = 0) -> torch.Tensor:
    if tensor.shape[dim] > batch_size:
        return tensor.narrow(dim, 0, batch_size)
    if tensor.shape[dim] < batch_size:
        repeats = [1] * tensor.dim()
        repeats[dim] = math.ceil(batch_size / tensor.shape[dim])
        return tensor.repeat(*repeats).narrow(dim, 0, batch_size)
    return tensor


def resize_to_batch_size(tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Evenly pick (or repeat) entries along dim 0 to get `batch_size` of them."""
    count = tensor.shape[0]
    if count == batch_size:
        return tensor
    if batch_size <= 1:
        return tensor[:batch_size]
    index = torch.linspace(0, count - 1, batch_size).round().long()
    return tensor[index]


def common_upscale(samples: torch.Tensor, width: int, height: int, upscale_method: str,
                   crop: str) -> torch.Tensor:
    """[B, C, H, W] resized with ComfyUI's method names and crop ("disabled" / "center")."""
    return imaging.resize(samples, width, height, upscale_method, crop)


def lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    return imaging.lanczos(samples, width, height)


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    return imaging.bislerp(samples, width, height)


def get_tiled_scale_steps(width: int, height: int, tile_x: int, tile_y: int,
                          overlap: int) -> int:
    rows = math.ceil(height / (tile_y - overlap)) if tile_y > overlap else 1
    cols = math.ceil(width / (tile_x - overlap)) if tile_x > overlap else 1
    return rows * cols


def tiled_scale(samples: torch.Tensor, function: Callable[[torch.Tensor], torch.Tensor],
                tile_x: int = 64, tile_y: int = 64, overlap: int = 8,
                upscale_amount: float = 4, out_channels: int = 3, output_device: Any = "cpu",
                pbar: ProgressBar | None = None) -> torch.Tensor:
    """`function` over overlapping tiles of `samples`, blended (Loom's tiler)."""
    if tile_x != tile_y:
        raise NotImplementedError(f"comfy.utils.tiled_scale with tile_x={tile_x} != "
                                  f"tile_y={tile_y}: Loom tiles squares; pass equal sizes")
    progress = (lambda done, total: pbar.update_absolute(done, total)) if pbar else None
    result = tiled_apply(function, samples, tile=tile_x, overlap=overlap,
                         scale=upscale_amount, out_channels=out_channels, progress=progress)
    return result.to(output_device)


def set_progress_bar_enabled(enabled: bool) -> None:
    """ComfyUI toggles console bars; Loom reports progress as events, so nothing to change."""


def set_progress_bar_global_hook(function: Callable[..., Any] | None) -> None:
    HOST.progress_hook = function


class ProgressBar:
    """A node's step counter: each update becomes a `progress` event of the running node."""

    def __init__(self, total: int, node_id: str | None = None) -> None:
        self.total = total
        self.current = 0
        current = running_node()
        self.node_id = node_id if node_id is not None else (
            current.node_id if current is not None else None)
        self._ctx = current

    def update_absolute(self, value: int, total: int | None = None,
                        preview: Any = None) -> None:
        if total is not None:
            self.total = total
        self.current = min(value, self.total) if self.total else value
        image = preview[1] if isinstance(preview, tuple) and len(preview) > 1 else preview
        if HOST.progress_hook is not None:
            HOST.progress_hook(self.current, self.total, preview, node_id=self.node_id)
        elif self._ctx is not None:
            self._ctx.progress(self.current, self.total, image)

    def update(self, value: int) -> None:
        self.update_absolute(self.current + value)


def copy_to_param(obj: torch.nn.Module, attr: str, value: torch.Tensor) -> None:
    *path, last = attr.split(".")
    for name in path:
        obj = getattr(obj, name)
    getattr(obj, last).data.copy_(value)


def get_attr(obj: Any, attr: str) -> Any:
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def set_attr(obj: Any, attr: str, value: Any) -> Any:
    *path, last = attr.split(".")
    for name in path:
        obj = getattr(obj, name)
    previous = getattr(obj, last)
    setattr(obj, last, value)
    return previous


def set_attr_param(obj: Any, attr: str, value: torch.Tensor) -> Any:
    return set_attr(obj, attr, torch.nn.Parameter(value, requires_grad=False))


# The LDM <-> diffusers UNet key correspondences (facts of the two layouts), which packs
# extend for their own architectures.
UNET_MAP_ATTENTIONS = {"proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias",
                       "norm.weight", "norm.bias"}
TRANSFORMER_BLOCKS = {
    f"{part}.{kind}" for part, kinds in (
        ("norm1", ("weight", "bias")), ("norm2", ("weight", "bias")),
        ("norm3", ("weight", "bias")), ("attn1.to_q", ("weight",)), ("attn1.to_k", ("weight",)),
        ("attn1.to_v", ("weight",)), ("attn1.to_out.0", ("weight", "bias")),
        ("attn2.to_q", ("weight",)), ("attn2.to_k", ("weight",)), ("attn2.to_v", ("weight",)),
        ("attn2.to_out.0", ("weight", "bias")), ("ff.net.0.proj", ("weight", "bias")),
        ("ff.net.2", ("weight", "bias"))) for kind in kinds}
UNET_MAP_RESNET = {
    "in_layers.2.weight": "conv1.weight", "in_layers.2.bias": "conv1.bias",
    "emb_layers.1.weight": "time_emb_proj.weight", "emb_layers.1.bias": "time_emb_proj.bias",
    "out_layers.3.weight": "conv2.weight", "out_layers.3.bias": "conv2.bias",
    "skip_connection.weight": "conv_shortcut.weight", "skip_connection.bias": "conv_shortcut.bias",
    "in_layers.0.weight": "norm1.weight", "in_layers.0.bias": "norm1.bias",
    "out_layers.0.weight": "norm2.weight", "out_layers.0.bias": "norm2.bias"}
UNET_MAP_BASIC = {
    ("label_emb.0.0.weight", "class_embedding.linear_1.weight"),
    ("label_emb.0.0.bias", "class_embedding.linear_1.bias"),
    ("label_emb.0.2.weight", "class_embedding.linear_2.weight"),
    ("label_emb.0.2.bias", "class_embedding.linear_2.bias"),
    ("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
    ("label_emb.0.0.bias", "add_embedding.linear_1.bias"),
    ("label_emb.0.2.weight", "add_embedding.linear_2.weight"),
    ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
    ("input_blocks.0.0.weight", "conv_in.weight"), ("input_blocks.0.0.bias", "conv_in.bias"),
    ("out.0.weight", "conv_norm_out.weight"), ("out.0.bias", "conv_norm_out.bias"),
    ("out.2.weight", "conv_out.weight"), ("out.2.bias", "conv_out.bias"),
    ("time_embed.0.weight", "time_embedding.linear_1.weight"),
    ("time_embed.0.bias", "time_embedding.linear_1.bias"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"),
    ("time_embed.2.bias", "time_embedding.linear_2.bias")}

# Internals Loom's loaders do not expose.
INTERNALS = ("unet_to_diffusers", "flux_to_diffusers", "mmdit_to_diffusers",
             "tiled_scale_multidim", "convert_sd_to", "ProgressBarTQDM")


def __getattr__(name: str) -> Any:
    if name in INTERNALS:
        from loom_internals import unavailable
        return unavailable(f"comfy.utils.{name}")
    raise AttributeError(f"comfy.utils has no {name!r} in Loom's facade")
