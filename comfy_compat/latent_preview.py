"""ComfyUI's `latent_preview` for custom-node packs: step callbacks that report progress and a
live latent -> RGB preview to the running node, as Loom's KSampler does."""

from __future__ import annotations

from typing import Any

from comfy.utils import ProgressBar
from loom_internals import unavailable
from PIL import Image
from torch import Tensor

from engine.comfy_host import from_pack
from engine.diffusion.patches.model_handle import LATENT_FORMATS, LatentFormat
from engine.diffusion.sampling.ksampler import preview_image

MAX_PREVIEW_RESOLUTION = 512
TAESD = unavailable("latent_preview.TAESD")  # Loom previews with latent2rgb only
TAESDPreviewerImpl = unavailable("latent_preview.TAESDPreviewerImpl")


class LatentPreviewer:
    def decode_latent_to_preview(self, x0: Tensor) -> Image.Image:
        raise NotImplementedError

    def decode_latent_to_preview_image(self, preview_format: str, x0: Tensor
                                       ) -> tuple[str, Image.Image, int]:
        return preview_format, self.decode_latent_to_preview(x0), MAX_PREVIEW_RESOLUTION


class Latent2RGBPreviewer(LatentPreviewer):
    """The linear latent -> RGB approximation (ComfyUI's constructor: the factors)."""

    def __init__(self, latent_rgb_factors: Any, latent_rgb_factors_bias: Any = None,
                 latent_rgb_factors_reshape: Any = None) -> None:
        if isinstance(latent_rgb_factors, LatentFormat):
            self.latent_format = latent_rgb_factors
            return
        factors = tuple(tuple(float(v) for v in row) for row in latent_rgb_factors)
        bias = tuple(float(v) for v in latent_rgb_factors_bias or (0.0, 0.0, 0.0))
        self.latent_format = LatentFormat(1.0, len(factors), factors, bias)  # type: ignore[arg-type]

    def decode_latent_to_preview(self, x0: Tensor) -> Image.Image:
        return preview_image(self.latent_format, x0)


def _loom_format(latent_format: Any) -> LatentFormat:
    if isinstance(latent_format, LatentFormat):
        return latent_format
    from comfy.latent_formats import SD_X4, SDXL
    if isinstance(latent_format, SD_X4):
        return LATENT_FORMATS["sd_x4"]
    return LATENT_FORMATS["sdxl" if isinstance(latent_format, SDXL) else "sd1"]


def get_previewer(device: Any, latent_format: Any) -> LatentPreviewer | None:
    from comfy.cli_args import LatentPreviewMethod, args
    if args.preview_method == LatentPreviewMethod.NoPreviews:
        return None
    return Latent2RGBPreviewer(_loom_format(latent_format))


def prepare_callback(model: Any, steps: int, x0_output_dict: dict[str, Any] | None = None
                     ) -> Any:
    """callback(step, x0, x, total_steps): progress (with a preview) for the running node."""
    handle = from_pack(model)
    previewer = get_previewer(handle.device, handle.latent_format)
    bar = ProgressBar(steps)

    def callback(step: int, x0: Tensor, x: Tensor, total_steps: int) -> None:
        if x0_output_dict is not None:
            x0_output_dict["x0"] = x0
        preview = None
        if previewer is not None and x0 is not None:
            preview = previewer.decode_latent_to_preview_image("JPEG", x0)
        bar.update_absolute(step + 1, total_steps, preview)

    return callback


def set_preview_method(override: str | None) -> None:
    """ComfyUI lets a node change the preview method; Loom keeps the one it started with."""
