"""The `VAE` value that nodes hold: an `AutoencoderKL` plus its latent scale, dtype and device,
with ComfyUI's encode/decode conventions (images [B, H, W, 3] in 0..1, scaled latents).

ComfyUI facts we follow (comfy/sd.py `VAE`, comfy/ldm/models/autoencoder.py):
- encode returns the posterior's mode (= its mean): current ComfyUI builds the SD VAEs'
  `DiagonalGaussianRegularizer` with its default `sample=False`, so VAEEncode is deterministic.
  Older versions (early 2024, where that default was True) sampled `mean + std * randn` from
  the unseeded global RNG; we do not reproduce that.
- pixels whose height or width is not a multiple of 8 are centre-cropped to one
  (offset = remainder // 2), as `vae_encode_crop_pixels` does; only the first 3 channels
  (RGB) are encoded, so an alpha channel is dropped.
- VAEDecodeTiled: when tile_size < 4 * overlap the overlap becomes tile_size // 4, and both
  are divided by 8 to latent cells; temporal_size/temporal_overlap only matter for video VAEs.
  ComfyUI averages three tilings (tile x tile, tile/2 x 2*tile, 2*tile x tile/2); we run the
  one square tiling with feathered blending, so tiled results are close to, not bit-equal with,
  ComfyUI's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
from torch import Tensor

from engine.diffusion.memory.cast_on_use import Holding, to_compute
from engine.diffusion.memory.offload import compute_device
from engine.diffusion.networks.tiling import Progress, tiled_apply
from engine.diffusion.networks.vae import AutoencoderKL, VAEConfig, vae_state_dict_from_any

# not stored in checkpoints: the std normalisation each family's UNet was trained with
LATENT_SCALES: Mapping[str, float] = MappingProxyType(
    {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
)
# rough peak activation count per image pixel, in units of `ch` (the full-resolution width):
# the decoder's top levels keep ~4 tensors of 2*ch channels alive at full resolution
_VALUES_PER_PIXEL_PER_CH = 8
DEFAULT_MEMORY_BUDGET = 2 * 1024**3


def latent_scale_for(family: str) -> float:
    """The latent scale factor of a model family ('sd1', 'sd2' or 'sdxl')."""
    try:
        return LATENT_SCALES[family]
    except KeyError:
        raise ValueError(
            f"unknown model family {family!r} for the VAE latent scale; expected one of "
            f"{sorted(LATENT_SCALES)} or pass latent_scale explicitly"
        ) from None


def crop_to_multiple(image: Tensor, multiple: int) -> Tensor:
    """Centre-crop [B, H, W, C] so H and W are multiples of `multiple` (as ComfyUI's VAEEncode)."""
    height, width = image.shape[1:3]
    new_h, new_w = height // multiple * multiple, width // multiple * multiple
    if new_h == 0 or new_w == 0:
        raise ValueError(
            f"image {height}x{width} is smaller than the VAE's {multiple}-pixel cell; "
            f"upscale it to at least {multiple}x{multiple}"
        )
    top, left = (height - new_h) // 2, (width - new_w) // 2
    return image[:, top : top + new_h, left : left + new_w]


class VAE:
    """An autoencoder ready for nodes: images [B, H, W, 3] in 0..1 <-> scaled latents."""

    def __init__(
        self,
        module: AutoencoderKL,
        *,
        latent_scale: float,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        output_device: torch.device | str = "cpu",
        max_batch: int | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 or None, got {max_batch}")
        self.module = to_compute(module, device, dtype).eval().requires_grad_(False)
        self.config: VAEConfig = module.config
        self.latent_scale = latent_scale
        self.dtype = dtype
        self.output_device = torch.device(output_device)
        self.max_batch = max_batch
        self.memory_budget = memory_budget

    @property
    def device(self) -> torch.device:
        """Where decoding and encoding run (the model manager's compute device when it manages
        the module, which then copies the weights there on use)."""
        return compute_device(self.module)

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, Tensor],
        *,
        family: str | None = None,
        latent_scale: float | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        hold_file_dtype: bool = False,
    ) -> VAE:
        """Build from any VAE/checkpoint state dict (see `vae_state_dict_from_any`) without
        copying: the module is made on the meta device and takes the tensors by assignment.
        With `hold_file_dtype`, tensors in a dtype that widens exactly into `dtype` are held
        as given and cast per layer when it runs (memory/cast_on_use.py); others are cast."""
        if (family is None) == (latent_scale is None):
            raise ValueError("pass exactly one of family ('sd1', 'sd2', 'sdxl') or latent_scale")
        scale = latent_scale if latent_scale is not None else latent_scale_for(family or "")
        holding = Holding(dtype, file_dtype=hold_file_dtype)
        weights = {name: holding.held(tensor)
                   for name, tensor in vae_state_dict_from_any(sd).items()}
        config = VAEConfig.from_state_dict(weights)
        with torch.device("meta"):
            module = AutoencoderKL(config)
        module.load_state_dict(weights, strict=True, assign=True)
        holding.apply(module)
        return cls(module, latent_scale=scale, dtype=dtype, device=device)

    @property
    def downscale(self) -> int:
        """Image pixels per latent cell along each axis (8 for KL-f8)."""
        return self.config.downscale

    @property
    def latent_channels(self) -> int:
        return self.config.z_channels

    def encode(self, image: Tensor) -> Tensor:
        """Image [B, H, W, C>=3] in 0..1 -> scaled latent [B, 4, H/8, W/8] (float32)."""
        pixels = self._prepare_pixels(image)
        return self._encode_batched(pixels) * self.latent_scale

    def decode(self, latent: Tensor) -> Tensor:
        """Scaled latent [B, 4, h, w] -> image [B, 8h, 8w, 3] in 0..1 (float32)."""
        self._check_latent(latent)
        return _to_image(self._decode_batched(latent / self.latent_scale))

    def encode_tiled(
        self,
        image: Tensor,
        tile_size: int = 512,
        overlap: int = 64,
        progress: Progress | None = None,
    ) -> Tensor:
        """`encode` in overlapping tiles of `tile_size` pixels (VAEEncodeTiled)."""
        pixels = self._prepare_pixels(image)
        tile, overlap = _node_tiling(tile_size, overlap)
        cell = self.downscale
        latent = tiled_apply(
            self._encode_batched,
            pixels,
            tile=max(cell, tile // cell * cell),
            overlap=overlap // cell * cell,
            scale=1 / cell,
            out_channels=self.latent_channels,
            progress=progress,
        )
        return latent * self.latent_scale

    def decode_tiled(
        self,
        latent: Tensor,
        tile_size: int = 512,
        overlap: int = 64,
        progress: Progress | None = None,
    ) -> Tensor:
        """`decode` in overlapping tiles; tile_size and overlap in image pixels (VAEDecodeTiled)."""
        self._check_latent(latent)
        tile, overlap = _node_tiling(tile_size, overlap)
        cell = self.downscale
        pixels = tiled_apply(
            self._decode_batched,
            latent / self.latent_scale,
            tile=max(1, tile // cell),
            overlap=overlap // cell,
            scale=cell,
            out_channels=self.config.out_channels,
            progress=progress,
        )
        return _to_image(pixels)

    def _prepare_pixels(self, image: Tensor) -> Tensor:
        if image.ndim != 4 or image.shape[-1] not in (3, 4):
            raise ValueError(
                f"VAE encode expects an IMAGE [B, H, W, 3] (channels last; a 4th alpha channel "
                f"is dropped), got shape {tuple(image.shape)}"
            )
        image = crop_to_multiple(image[..., :3], self.downscale)
        return image.movedim(-1, 1) * 2.0 - 1.0  # (B, 3, H, W) in -1..1

    def _check_latent(self, latent: Tensor) -> None:
        if latent.ndim != 4 or latent.shape[1] != self.latent_channels:
            raise ValueError(
                f"VAE decode expects a latent [B, {self.latent_channels}, h, w], got shape "
                f"{tuple(latent.shape)}; is this latent from a model with another VAE?"
            )

    def _encode_batched(self, pixels: Tensor) -> Tensor:
        height, width = pixels.shape[-2:]
        return self._in_chunks(self.module.encode_mean, pixels, height * width)

    def _decode_batched(self, latent: Tensor) -> Tensor:
        height, width = latent.shape[-2:]
        return self._in_chunks(self.module.decode, latent, height * width * self.downscale**2)

    @torch.no_grad()
    def _in_chunks(self, fn: Callable[[Tensor], Tensor], x: Tensor, pixels: int) -> Tensor:
        """Run `fn` over batch chunks small enough for the memory budget; float32 out."""
        chunk = self._batch_limit(pixels)
        outputs = [
            fn(part.to(device=self.device, dtype=self.dtype)).to(self.output_device, torch.float32)
            for part in x.split(chunk)
        ]
        return torch.cat(outputs)

    def _batch_limit(self, pixels: int) -> int:
        """Images per forward pass: `max_batch`, else what fits the memory budget (at least 1)."""
        if self.max_batch is not None:
            return self.max_batch
        itemsize = torch.finfo(self.dtype).bits // 8
        activations = pixels * self.config.ch * _VALUES_PER_PIXEL_PER_CH
        attention = (pixels // self.downscale**2) ** 2  # the mid block's (h*w)^2 score matrix
        return max(1, self.memory_budget // ((activations + attention) * itemsize))


def _node_tiling(tile_size: int, overlap: int) -> tuple[int, int]:
    """ComfyUI's tiled-node rule: an overlap above a quarter of the tile becomes a quarter."""
    if tile_size <= 0 or overlap < 0:
        raise ValueError(f"tile_size {tile_size} must be > 0 and overlap {overlap} >= 0")
    if tile_size < overlap * 4:
        overlap = tile_size // 4
    return tile_size, overlap


def _to_image(pixels: Tensor) -> Tensor:
    """Decoder output [B, 3, H, W] in about -1..1 -> IMAGE [B, H, W, 3] clamped to 0..1."""
    return ((pixels + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1).contiguous()
