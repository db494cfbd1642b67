"""CONDITIONING turned into the per-entry model inputs of guidance, by ComfyUI's rules.

A CONDITIONING is a list of ``[cond (1, T, D), options]`` pairs. Just before sampling, each
pair becomes a ``CondEntry`` resolved against the latent being sampled:

* ``area`` (ConditioningSetArea) is ``(height, width, y, x)`` in latent cells;
  ``("percentage", h, w, y, x)`` (ConditioningSetAreaPercentage) becomes
  ``(max(1, round(h * H)), max(1, round(w * W)), round(y * H), round(x * W))``.
* ``mask`` (ConditioningSetMask) is resized bilinearly to the latent size; with
  ``set_area_to_bounds`` ("mask bounds") the area becomes the mask's bounding box, at least
  8 x 8 cells (an all-zero mask gives ``(8, 8, 0, 0)``).
* ``start_percent``/``end_percent`` become a sigma range (``percent_to_sigma``); the entry only
  takes part while ``sigma_end <= sigma <= sigma_start``.
* SDXL's vector ``y``: pooled output plus the size keys; width/height default to the latent
  size * 8, crops to 0, target sizes to width/height; the refiner's ``aesthetic_score``
  defaults to 6 for positive and 2.5 for negative prompts.
* The SD x4 upscaler gets the cond's ``concat_image`` (noise-augmented) as 3 extra channels and
  its augmentation level as the class label ``y``; Lotus-D gets its task embedding as ``y``
  (image_conditioned.py).
* An 8-channel instruct-pix2pix UNet gets the cond's ``concat_latent_image`` (unscaled) or
  zeros after its 4 latent channels.
* A 9-channel inpainting UNet gets ``cat(mask, masked-image latent)`` after its 4 latent
  channels: the cond's ``concat_mask``/``concat_latent_image`` (InpaintModelConditioning; the
  image is scaled like any latent going in), else the latent's noise mask and the latent itself
  (VAEEncodeForInpaint), else a mask of ones and the latent of a black image.
* Each area entry on one side gets a twin on the other side with the same area (and strength,
  mask, range) but the text of the smallest entry there containing that area, so cond and
  uncond are weighted alike in the region.
* ``cross_attn_controlnet`` (CLIPTextEncodeControlnet) replaces the text tokens the entry's
  ControlNet sees; the UNet keeps the entry's own.
* ``hooks`` (ConditioningSetProperties ...) are weight hooks applied while the entry runs;
  ``default`` entries (ConditioningSetDefaultCombine) only fill the weight the side's other
  entries leave (1 - their summed weights, clipped at 0); ``clip_start_percent`` /
  ``clip_end_percent`` (a scheduled CLIP encoding) narrow the entry's range further.
* A positive entry marked ``control_apply_to_uncond`` lends its ControlNet to an area-less
  negative entry that has none.
* ``gligen`` (GLIGENTextBoxApply) is ``(kind, model, [(phrase, height, width, y, x), ...])``
  with the boxes in latent cells; at each evaluation it becomes a UNet ``middle_patch`` for
  the entry's (area-cropped) latent, so such entries never share a UNet batch. Unless some
  area-less negative entry has grounding of its own, every area-less positive entry's
  grounding is lent to an area-less negative entry (in turn), as ComfyUI does.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.diffusion.networks.noise_augment import unclip_adm
from engine.diffusion.networks.unet import ADM_NUMBER_DIM, sdxl_adm, sdxl_refiner_adm
from engine.diffusion.networks.unet_patches import TokensPatch, UNetPatches
from engine.diffusion.patches.hooks import HookGroup
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.sampling.image_conditioned import (
    lotus_task_embedding,
    x4_class_label,
    x4_concat,
)
from engine.image_ops import repeat_to_batch, resize_center

logger = logging.getLogger("loom.conditioning")

Area = tuple[int, int, int, int]  # (height, width, y, x) in latent cells
Conditioning = Sequence[Sequence[Any]]  # [[cond (1, T, D), options dict], ...]

MIN_BOUNDS_AREA = 8  # "mask bounds" areas are at least this many latent cells on each side
# The scaled SD latent of an all-black image: what an inpainting UNet sees as its masked image
# when nothing was masked (ComfyUI's constants).
BLANK_INPAINT_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)
REFINER_AESTHETIC_SCORE = MappingProxyType({"positive": 6.0, "negative": 2.5})
UNCLIP_SEED_OFFSET = 10  # ComfyUI draws unCLIP's embedding noise from seed - 10
UNCLIP_MERGE_AUGMENTATION = 0.05  # several images: their sum is noised again at this level
IP2P_IN_CHANNELS = 8  # latent + the source image's latent


@runtime_checkable
class ControlProvider(Protocol):
    """A ControlNet (or anything alike) attached to a cond entry as ``options["control"]``.

    ``residuals`` is called once for every UNet evaluation of a batch holding that entry, with
    exactly what the UNet gets:

    * ``x_in``: (B, 4, h, w) noisy latent after the c_in scaling, without an inpainting UNet's
      extra channels; cropped to the entry's area if it has one;
    * ``timestep``: (B,) float32 model timesteps (0..999);
    * ``context``: (B, T, D) cross-attention tokens; ``y``: (B, adm) SDXL vector or None;
    * ``sigma``: (B,) noise levels (for timestep-range checks).

    B can hold several entries (cond and uncond batched, uncond first): entries share a batch
    only when they carry the same provider object. Return ``(down, mid)``: one residual per
    UNet input block, in order (``len(unet.input_blocks)``), and one for the middle block;
    either may be None (nothing added). Chaining several ControlNets is the provider's business.

    Optional hooks, called when the object has them:

    * ``prepare(model: ModelHandle, latent_shape: torch.Size) -> None``: once per sampling
      run, before the first model call, for each distinct provider object;
    * ``input_residuals(x_in, timestep, context, y, sigma) -> list[Tensor | None] | None``:
      per model call, one per UNet input block, added to that block's output (T2I-Adapters);
    * ``cleanup() -> None``: once after the run, also when it failed or was interrupted.
    """

    def residuals(self, x_in: Tensor, timestep: Tensor, context: Tensor, y: Tensor | None,
                  sigma: Tensor) -> tuple[list[Tensor] | None, Tensor | None]: ...


@runtime_checkable
class GroundingModel(Protocol):
    """The model in a ``gligen`` option (GLIGEN): ``middle_patch(positions, latent_shape,
    device)`` gives the UNet patch grounding a (B, C, h, w) latent in those boxes (no boxes:
    empty grounding)."""

    def middle_patch(self, positions: Sequence[Any], latent_shape: Sequence[int],
                     device: torch.device) -> TokensPatch: ...


@dataclass(frozen=True)
class Grounding:
    """An entry's GLIGEN boxes: the model and (phrase, height, width, y, x) per box."""

    model: GroundingModel
    positions: tuple[Any, ...]

    def unet_patches(self, latent_shape: Sequence[int], device: torch.device) -> UNetPatches:
        patch = self.model.middle_patch(self.positions, latent_shape, device)
        return UNetPatches().adding("middle_patch", patch)


@dataclass(frozen=True, eq=False)
class ModelInputs:
    """What the UNet gets for one entry besides the latent and the timestep."""

    context: Tensor  # (1, T, D) cross-attention tokens
    y: Tensor | None = None  # (1, adm) vector conditioning, or (1,) x4 upscaler class label
    concat: Tensor | None = None  # (B, C, H, W) extra input channels at the full latent size
    control_context: Tensor | None = None  # (1, T, D) tokens a ControlNet gets instead


@dataclass(frozen=True, eq=False)
class CondEntry:
    """One CONDITIONING entry resolved against the latent being sampled."""

    inputs: ModelInputs
    area: Area | None = None
    strength: float = 1.0
    mask: Tensor | None = None  # (Bm, H, W) at the latent size
    mask_strength: float = 1.0
    sigma_start: float | None = None  # used only while sigma <= sigma_start
    sigma_end: float | None = None  # ... and sigma >= sigma_end
    control: ControlProvider | None = None
    control_to_uncond: bool = False
    hooks: HookGroup | None = None  # weight hooks applied while this entry is evaluated
    default: bool = False  # used only where the side's other entries leave weight uncovered
    grounding: Grounding | None = None

    def active_at(self, sigma: float) -> bool:
        """Whether the entry's timestep range includes this sigma."""
        if self.sigma_start is not None and sigma > self.sigma_start:
            return False
        return self.sigma_end is None or sigma >= self.sigma_end


@dataclass(frozen=True, eq=False)
class SamplingInputs:
    """The latent a CONDITIONING is resolved against (all on the model's device)."""

    noise_shape: torch.Size  # (B, C, H, W)
    latent_image: Tensor  # the input latent, already scaled into the model's space
    denoise_mask: Tensor | None  # (B, C, H, W) noise mask, or None
    device: torch.device
    sigmas: Tensor | None = None  # the run's schedule (what patches see as sample_sigmas)
    seed: int = 0  # the run's noise seed (unCLIP's embedding noise is drawn from seed - 10)


def prepare_entries(model: ModelHandle, conditioning: Conditioning, prompt_type: str,
                    inputs: SamplingInputs) -> list[CondEntry]:
    """Every entry of one CONDITIONING, ready for guidance (`prompt_type`: positive/negative)."""
    if not isinstance(conditioning, Sequence) or isinstance(conditioning, (str, bytes)):
        raise TypeError(f"the {prompt_type} input must be a CONDITIONING (a list of "
                        f"[tensor, options] pairs), got {type(conditioning).__name__}; connect "
                        f"a CLIPTextEncode or another conditioning node")
    return [_entry(model, pair, prompt_type, inputs) for pair in conditioning]


def pair_entries(positive: list[CondEntry], negative: list[CondEntry]
                 ) -> tuple[list[CondEntry], list[CondEntry]]:
    """Area twins on both sides, then ControlNets shared with the uncond (module docstring)."""
    positive, negative = pair_entry_sets([positive, negative])
    return positive, negative


def pair_entry_sets(sets: Sequence[list[CondEntry]]) -> list[list[CondEntry]]:
    """`pair_entries` for any number of prompts, the positive first (DualCFGGuider's three):
    each set's area entries get twins in every other set, set by set in order; then the
    positive's ControlNets are shared with each of the others."""
    paired = [list(entries) for entries in sets]
    for index, own in enumerate(paired):
        for entry in list(own):
            for other in paired[:index] + paired[index + 1:]:
                _add_area_twin(other, entry)
    positive = paired[0]
    return [positive] + [_share_grounding(positive, _share_controls(positive, other))
                         for other in paired[1:]]


def _entry(model: ModelHandle, pair: Sequence[Any], prompt_type: str,
           inputs: SamplingInputs) -> CondEntry:
    cond, options = _split_pair(pair, prompt_type)
    dims = tuple(inputs.noise_shape[2:])
    area = resolve_area(options.get("area"), dims)
    mask = options.get("mask")
    if mask is not None:
        mask = resize_cond_mask(mask, dims, inputs.device)
        if options.get("set_area_to_bounds", False):
            area = mask_bounds(mask)
    sampling = model.sampling
    start, end = options.get("start_percent"), options.get("end_percent")
    if "clip_start_percent" in options:  # one range of a scheduled CLIP encoding (hooks)
        start = max(float(options["clip_start_percent"]), float(start or 0.0))
        end = min(float(options["clip_end_percent"]), 1.0 if end is None else float(end))
    model_inputs = ModelInputs(
        context=cond.to(inputs.device),
        y=adm_vector(model, options, prompt_type, inputs.noise_shape, inputs.device,
                     inputs.seed),
        concat=concat_channels(model, options, inputs),
        control_context=_on(options.get("cross_attn_controlnet"), inputs.device))
    return CondEntry(
        model_inputs, area=area, strength=float(options.get("strength", 1.0)), mask=mask,
        mask_strength=float(options.get("mask_strength", 1.0)),
        sigma_start=None if start is None else sampling.percent_to_sigma(float(start)),
        sigma_end=None if end is None else sampling.percent_to_sigma(float(end)),
        control=options.get("control"),
        control_to_uncond=bool(options.get("control_apply_to_uncond", False)),
        hooks=options.get("hooks"), default=bool(options.get("default", False)),
        grounding=grounding_of(options.get("gligen"), prompt_type))


def _on(value: Tensor | None, device: torch.device) -> Tensor | None:
    return None if value is None else value.to(device)


def grounding_of(option: Any, prompt_type: str) -> Grounding | None:
    """The ``gligen`` option as a Grounding: "position" carries boxes; any other kind is
    GLIGEN's empty grounding (every slot null)."""
    if option is None:
        return None
    if (not isinstance(option, Sequence) or len(option) != 3
            or not isinstance(option[1], GroundingModel)):
        raise TypeError(f"the {prompt_type} conditioning's 'gligen' option must be (kind, "
                        f"GLIGEN model, boxes), got {option!r:.120}; set it with "
                        "GLIGENTextBoxApply")
    kind, model, positions = option
    return Grounding(model, tuple(positions) if kind == "position" else ())


def _split_pair(pair: Sequence[Any], prompt_type: str) -> tuple[Tensor, Mapping[str, Any]]:
    if (not isinstance(pair, Sequence) or len(pair) < 2 or not isinstance(pair[0], Tensor)
            or not isinstance(pair[1], Mapping)):
        raise TypeError(f"{prompt_type} conditioning entries must be [tensor (1, tokens, width), "
                        f"options dict] pairs, got {type(pair).__name__}; build it with "
                        f"CLIPTextEncode or a conditioning node")
    cond = pair[0]
    if cond.ndim != 3:
        raise ValueError(f"{prompt_type} conditioning tensor has shape {tuple(cond.shape)}; "
                         f"expected (batch, tokens, width) from a text encoder")
    return cond, pair[1]


def resolve_area(area: Any, dims: tuple[int, ...]) -> Area | None:
    """A stored area in latent cells; percentage areas scaled to the latent size `dims`."""
    if area is None:
        return None
    if len(area) == 5 and area[0] == "percentage":
        height, width = dims[0], dims[1]
        _, h, w, y, x = area
        return (max(1, round(h * height)), max(1, round(w * width)), round(y * height),
                round(x * width))
    if len(area) != 4:
        raise ValueError(f"conditioning area {area!r} is not (height, width, y, x) in latent "
                         f"cells; set it with ConditioningSetArea")
    return tuple(int(value) for value in area)  # type: ignore[return-value]


def resize_cond_mask(mask: Tensor, dims: tuple[int, ...], device: torch.device) -> Tensor:
    """A conditioning mask as (B, H, W) at the latent size (bilinear, as ComfyUI)."""
    mask = mask.to(device=device, dtype=torch.float32)
    if mask.ndim == len(dims):
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise ValueError(f"a conditioning mask must be (batch, height, width), got shape "
                         f"{tuple(mask.shape)}; connect a MASK to ConditioningSetMask")
    if tuple(mask.shape[1:]) != dims:
        mask = F.interpolate(mask.unsqueeze(1), size=dims, mode="bilinear",
                             align_corners=False).squeeze(1)
    return mask


def mask_bounds(mask: Tensor) -> Area:
    """The bounding box of a (B, H, W) mask's non-zero cells, at least 8 x 8 cells."""
    bounds = mask.abs().max(dim=0).values
    rows, cols = torch.where(bounds != 0)
    if rows.numel() == 0:
        return (MIN_BOUNDS_AREA, MIN_BOUNDS_AREA, 0, 0)
    top, left = int(rows.min()), int(cols.min())
    height = max(MIN_BOUNDS_AREA, int(rows.max()) - top + 1)
    width = max(MIN_BOUNDS_AREA, int(cols.max()) - left + 1)
    return (height, width, top, left)


def adm_vector(model: ModelHandle, options: Mapping[str, Any], prompt_type: str,
               noise_shape: torch.Size, device: torch.device, seed: int = 0) -> Tensor | None:
    """The vector conditioning `y` for one entry (SDXL's, or an unCLIP model's image
    embedding); None for models without one. unCLIPConditioning entries replace SDXL's pooled
    text with the noised image embedding (ComfyUI's "revision")."""
    if model.family == "sd_x4":
        return x4_class_label(options, device)
    if model.family == "lotus":
        return lotus_task_embedding(device)
    if model.config.adm_in_channels is None:
        return None
    unclip = options.get("unclip_conditioning")
    if model.family == "sd2":  # SD 2.1 unCLIP: zeros without an image
        if unclip is None:
            return torch.zeros((1, model.config.adm_in_channels), device=device)
        return unclip_adm(unclip, device, seed - UNCLIP_SEED_OFFSET,
                          options.get("unclip_noise_augment_merge", UNCLIP_MERGE_AUGMENTATION))
    pooled = options.get("pooled_output")
    if unclip is not None:
        numbers = 5 if model.family == "sdxl_refiner" else 6  # size/crop/score numbers in y
        width = model.config.adm_in_channels - numbers * ADM_NUMBER_DIM  # 1280 when released
        pooled = unclip_adm(unclip, device, seed - UNCLIP_SEED_OFFSET)[:, :width]
    if pooled is None:
        raise ValueError(f"the {prompt_type} conditioning has no pooled_output, which an "
                         f"{model.family} model needs; encode the prompt with CLIPTextEncode "
                         f"(or CLIPTextEncodeSDXL) from this checkpoint's CLIP")
    pooled = pooled.to(device)
    width = options.get("width", noise_shape[3] * 8)
    height = options.get("height", noise_shape[2] * 8)
    crop_w, crop_h = options.get("crop_w", 0), options.get("crop_h", 0)
    if model.family == "sdxl_refiner":
        score = options.get("aesthetic_score", REFINER_AESTHETIC_SCORE.get(prompt_type, 6.0))
        return sdxl_refiner_adm(pooled, width=width, height=height, crop_w=crop_w,
                                crop_h=crop_h, aesthetic_score=score)
    if model.family != "sdxl":
        raise ValueError(f"model family {model.family!r} takes a vector conditioning Loom "
                         f"cannot build; only SDXL base and refiner models are supported")
    return sdxl_adm(pooled, width=width, height=height, crop_w=crop_w, crop_h=crop_h,
                    target_width=options.get("target_width", width),
                    target_height=options.get("target_height", height))


def concat_channels(model: ModelHandle, options: Mapping[str, Any],
                    inputs: SamplingInputs) -> Tensor | None:
    """The extra input channels of an inpainting (9), instruct-pix2pix (8) or x4 upscaler (7)
    UNet, else None."""
    if model.family == "sd_x4":
        return x4_concat(options, inputs.noise_shape, inputs.device, inputs.seed)
    if model.in_channels == IP2P_IN_CHANNELS:
        return ip2p_concat(options, inputs)
    return inpaint_concat(model, options, inputs)


def ip2p_concat(options: Mapping[str, Any], inputs: SamplingInputs) -> Tensor:
    """instruct-pix2pix's 4 extra channels: the cond's source-image latent as the VAE gave it
    (InstructPixToPixConditioning; ComfyUI does not scale it for these models), resized to the
    latent, or zeros when the cond has none."""
    shape = inputs.noise_shape
    image = options.get("concat_latent_image")
    if image is None:
        return torch.zeros((shape[0], 4, *shape[2:]), device=inputs.device)
    image = image.to(inputs.device, torch.float32)
    if tuple(image.shape[-2:]) != tuple(shape[-2:]):
        image = resize_center(image, shape[-2], shape[-1])
    return repeat_to_batch(image, shape[0])


def inpaint_concat(model: ModelHandle, options: Mapping[str, Any],
                   inputs: SamplingInputs) -> Tensor | None:
    """The 5 extra input channels (mask, masked-image latent) of an inpainting UNet."""
    if not model.is_inpaint:
        return None
    shape = inputs.noise_shape
    image = options.get("concat_latent_image")
    if image is None:
        image = inputs.latent_image
    else:
        image = image.to(inputs.device, torch.float32) * model.latent_format.scale
    if tuple(image.shape[1:]) != tuple(shape[1:]):
        image = resize_center(image, shape[-2], shape[-1])
    image = repeat_to_batch(image, shape[0])
    mask = options.get("concat_mask", inputs.denoise_mask)
    if mask is None:
        ones = torch.ones((shape[0], 1, *shape[2:]), device=inputs.device)
        return torch.cat([ones, blank_inpaint_latent(shape, inputs.device)], dim=1)
    mask = mask.to(inputs.device, torch.float32)
    if mask.ndim == len(shape):
        mask = mask[:, :1]
    mask = mask.reshape((-1, 1, *mask.shape[-2:]))
    if tuple(mask.shape[-2:]) != tuple(shape[-2:]):
        mask = resize_center(mask, shape[-2], shape[-1])
    return torch.cat([repeat_to_batch(mask.round(), shape[0]), image], dim=1)


def blank_inpaint_latent(shape: torch.Size, device: torch.device) -> Tensor:
    """A (B, 4, H, W) latent of a black image (ComfyUI's constants, scaled space)."""
    values = torch.tensor(BLANK_INPAINT_LATENT, device=device).view(1, 4, 1, 1)
    return values.expand(shape[0], 4, *shape[2:]).clone()


def _area_inside(inner: Area, outer: Area) -> bool:
    """Whether area `inner` lies within area `outer`."""
    if inner[2] < outer[2] or inner[3] < outer[3]:
        return False
    return (inner[0] + inner[2] <= outer[0] + outer[2]
            and inner[1] + inner[3] <= outer[1] + outer[3])


def _add_area_twin(others: list[CondEntry], entry: CondEntry) -> None:
    """Append to `others` an entry like `entry` with the text of its smallest container."""
    if entry.area is None:
        return
    smallest: CondEntry | None = None
    for other in others:
        if other.area is None:
            smallest = other if smallest is None else smallest
        elif _area_inside(entry.area, other.area) and (
                smallest is None or smallest.area is None
                or math.prod(smallest.area[:2]) > math.prod(other.area[:2])):
            smallest = other
    if smallest is None or smallest.area == entry.area:
        return
    others.append(dataclasses.replace(entry, inputs=smallest.inputs))


def _share_controls(positive: list[CondEntry], negative: list[CondEntry]) -> list[CondEntry]:
    lent = [entry.control for entry in positive
            if entry.control_to_uncond and entry.area is None and entry.control is not None]
    if not lent or any(e.area is None and e.control is not None for e in negative):
        return negative
    free = [index for index, e in enumerate(negative) if e.area is None and e.control is None]
    if not free:
        logger.warning("a ControlNet marked for the negative prompt found no negative "
                       "conditioning without an area to attach to; it is not applied there")
        return negative
    return _lend(negative, free, "control", lent)


def _share_grounding(positive: list[CondEntry], negative: list[CondEntry]) -> list[CondEntry]:
    """Area-less positive groundings lent, in turn, to the area-less negative entries without
    one, unless a negative entry already has its own (ComfyUI's rule for "gligen")."""
    lent = [entry.grounding for entry in positive
            if entry.area is None and entry.grounding is not None]
    if not lent or any(e.area is None and e.grounding is not None for e in negative):
        return negative
    free = [index for index, e in enumerate(negative) if e.area is None]
    if not free:
        logger.warning("GLIGEN boxes of the positive prompt found no negative conditioning "
                       "without an area to attach to; the negative runs without grounding")
        return negative
    return _lend(negative, free, "grounding", lent)


def _lend(negative: list[CondEntry], free: list[int], field: str, lent: list[Any]
          ) -> list[CondEntry]:
    """The negative entries with `field` set to the lent values, given in turn to the entries
    at the `free` indices (cycling when there are more values than entries)."""
    shared = list(negative)
    for count, value in enumerate(lent):
        index = free[count % len(free)]
        shared[index] = dataclasses.replace(shared[index], **{field: value})
    return shared
