"""Which model a single-file checkpoint holds, told from its keys and shapes alone (plus one
bias tensor for SD2 v-prediction), following shared/formats/README.md "Rules a loader needs"."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from engine.diffusion.checkpoints.safetensors_io import shapes_of

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# context width of the UNet's cross-attention -> family
FAMILY_BY_CONTEXT = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl_refiner"}
LATENT_SCALE = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025, "sdxl_refiner": 0.13025,
                "sd_x4": 0.08333, "lotus": 0.18215}
# text encoder slot -> key prefixes tried in order (old SD1 merges lack "text_model.")
TEXT_PREFIXES: dict[str, dict[str, tuple[str, ...]]] = {
    "sd1": {"clip_l": ("cond_stage_model.transformer.text_model.",
                       "cond_stage_model.transformer.")},
    "sd2": {"clip_h": ("cond_stage_model.model.",)},
    "sdxl": {"clip_l": ("conditioner.embedders.0.transformer.text_model.",),
             "clip_g": ("conditioner.embedders.1.model.",)},
    "sdxl_refiner": {"clip_g": ("conditioner.embedders.0.model.",)},
    "sd_x4": {"clip_h": ("cond_stage_model.model.",)},  # SD2's text encoder
    "lotus": {"clip_h": ("cond_stage_model.model.",)},
}
# SD2-width UNets ComfyUI tells apart from SD2 by their inputs (model_detection facts): the x4
# upscaler takes 7 channels and a class-label noise level (`label_emb.weight`); Lotus-D a
# 4-wide task embedding as y. Both read SD2's text encoder where a file carries one.
X4_IN_CHANNELS = 7
X4_LABEL_KEY = "label_emb.weight"
LOTUS_ADM_CHANNELS = 4
TEXT_FAMILY = {"sd_x4": "sd2", "lotus": "sd2"}
# families trained with one parameterisation, whatever their weights look like
FIXED_PREDICTION = {"sd_x4": "v", "lotus": "img_to_img"}
V_PRED_PROBE = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_PRED_STD = 0.09  # ComfyUI's threshold on that bias's spread for SD2 768-v files
# CosXL / CosXL edit: v-prediction on a continuous EDM sigma range stored in these keys.
EDM_VPRED_MAX, EDM_VPRED_MIN = "edm_vpred.sigma_max", "edm_vpred.sigma_min"
EDM_SIGMA_MIN = 0.002  # the range's lower end when the file stores only its upper end


class UnknownLayoutError(ValueError):
    """The file is not a checkpoint layout Loom knows; the message says what was found."""


@dataclass(frozen=True)
class CheckpointLayout:
    """What a checkpoint contains and where each component's keys start."""

    family: str                      # sd1 | sd2 | sdxl | sdxl_refiner
    in_channels: int                 # 4 normal, 9 inpainting, 8 instruct-pix2pix
    model_channels: int
    context_dim: int
    adm_in_channels: int | None
    prediction: str                  # eps | v | img_to_img (Lotus)
    zsnr: bool = False
    edm_sigmas: tuple[float, float] | None = None  # (min, max) of an EDM v-prediction model
    unet_prefix: str | None = UNET_PREFIX
    vae_prefix: str | None = None
    text_prefixes: dict[str, str] = field(default_factory=dict)

    @property
    def latent_scale(self) -> float:
        return LATENT_SCALE[self.family]

    @property
    def text_family(self) -> str:
        """The family whose text encoder the file carries (the x4 upscaler's is SD2's)."""
        return TEXT_FAMILY.get(self.family, self.family)

    @property
    def is_inpaint(self) -> bool:
        return self.in_channels == 9

    @property
    def is_unclip(self) -> bool:
        """SD 2.1 unCLIP: an SD2 UNet whose `y` is a noised CLIP image embedding."""
        return self.family == "sd2" and self.adm_in_channels is not None

    def describe(self) -> str:
        names = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL base", "sdxl_refiner":
                 "SDXL refiner", "sd_x4": "Stable Diffusion x4 upscaler",
                 "lotus": "Lotus-D (depth/normal)"}
        extra = " inpainting" if self.is_inpaint else " unCLIP" if self.is_unclip else ""
        return f"{names[self.family]}{extra} ({self.prediction}-prediction)"


def component_summary(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The top-level key prefixes and their tensor counts, for error messages."""
    counts = Counter(".".join(name.split(".")[:2]) if "." in name else name for name in shapes)
    return ", ".join(f"{prefix}.* ({count})" for prefix, count in counts.most_common(8))


def family_from_text_prefixes(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The family the text-encoder key prefixes point to (a cross-check from formats/README;
    it decides for small test checkpoints whose context width is not a standard one)."""
    matches = [family for family in ("sdxl", "sdxl_refiner", "sd2", "sd1")
               if all(any(name.startswith(candidates[0]) for name in shapes)
                      for candidates in TEXT_PREFIXES[family].values())]
    return matches[0] if matches else None


def detect_unet(shapes: Mapping[str, tuple[int, ...]], prefix: str,
                family_hint: str | None = None) -> dict[str, object]:
    """Family and sizes of the UNet whose keys start with `prefix` (`family_hint`: what the
    file's metadata says, used when the shapes alone cannot tell)."""
    first = shapes.get(prefix + "input_blocks.0.0.weight")
    if first is None or len(first) != 4:
        raise UnknownLayoutError(f"no UNet found: expected {prefix}input_blocks.0.0.weight; "
                                 f"found {component_summary(shapes)}")
    contexts = {shape[1] for name, shape in shapes.items()
                if name.startswith(prefix) and name.endswith("attn2.to_k.weight")}
    model_channels, in_channels = first[0], first[1]
    family = (FAMILY_BY_CONTEXT.get(next(iter(contexts))) if len(contexts) == 1 else None
              ) or family_from_text_prefixes(shapes) or family_hint
    if len(contexts) != 1 or family is None:
        raise UnknownLayoutError(
            f"unknown UNet: {in_channels} input channels, {model_channels} model channels, "
            f"cross-attention context width(s) {sorted(contexts) or 'none'} (known: "
            f"{sorted(FAMILY_BY_CONTEXT)}); found {component_summary(shapes)}")
    context = next(iter(contexts))
    adm = shapes.get(prefix + "label_emb.0.0.weight")
    adm_in_channels = adm[1] if adm else None
    if family in ("sd2", "sd_x4", "lotus"):
        family = sd2_variant(shapes, prefix, in_channels, adm_in_channels)
    return {"family": family, "in_channels": in_channels,
            "model_channels": model_channels, "context_dim": context,
            "adm_in_channels": adm_in_channels}


def sd2_variant(shapes: Mapping[str, tuple[int, ...]], prefix: str, in_channels: int,
                adm_in_channels: int | None) -> str:
    """sd_x4, lotus or plain sd2 for a UNet of SD2's text width, by its inputs."""
    if in_channels == X4_IN_CHANNELS and prefix + X4_LABEL_KEY in shapes:
        return "sd_x4"
    if in_channels == 4 and adm_in_channels == LOTUS_ADM_CHANNELS:
        return "lotus"
    return "sd2"


def detect_prediction(state: Mapping[str, torch.Tensor], family: str, in_channels: int,
                      unet_prefix: str) -> tuple[str, bool]:
    """(eps|v|img_to_img, zsnr): the family's fixed parameterisation (x4 upscaler: v, Lotus:
    img_to_img), marker keys, then SD2 unCLIP (always v), then ComfyUI's bias-spread rule for
    SD2."""
    if family in FIXED_PREDICTION:
        return FIXED_PREDICTION[family], False
    if "v_pred" in state:
        return "v", "ztsnr" in state
    if family == "sd2" and unet_prefix + "label_emb.0.0.weight" in state:
        return "v", False
    if family == "sd2" and in_channels == 4:
        probe = state.get(unet_prefix + V_PRED_PROBE)
        if probe is not None and float(probe.float().std(unbiased=False)) > V_PRED_STD:
            return "v", False
    return "eps", False


def detect_edm_sigmas(state: Mapping[str, torch.Tensor], family: str
                      ) -> tuple[float, float] | None:
    """(sigma_min, sigma_max) of an SDXL file marked as EDM v-prediction (CosXL), else None."""
    if family != "sdxl" or EDM_VPRED_MAX not in state:
        return None
    low = state.get(EDM_VPRED_MIN)
    return (EDM_SIGMA_MIN if low is None else float(low.float().item()),
            float(state[EDM_VPRED_MAX].float().item()))


def find_text_prefixes(shapes: Mapping[str, tuple[int, ...]], family: str) -> dict[str, str]:
    """Text encoder slot -> the prefix its keys use in this file (slots absent are left out)."""
    found = {}
    for slot, candidates in TEXT_PREFIXES[family].items():
        for prefix in candidates:
            if any(name.startswith(prefix) for name in shapes):
                found[slot] = prefix
                break
    return found


def detect_checkpoint(state: Mapping[str, torch.Tensor]) -> CheckpointLayout:
    """Detect a single-file checkpoint (UNet under model.diffusion_model.)."""
    shapes = shapes_of(state)
    unet = detect_unet(shapes, UNET_PREFIX)
    family = str(unet["family"])
    prediction, zsnr = detect_prediction(state, family, int(unet["in_channels"]), UNET_PREFIX)
    has_vae = any(name.startswith(VAE_PREFIX) for name in shapes)
    edm_sigmas = detect_edm_sigmas(state, family)
    return CheckpointLayout(**unet, prediction="v" if edm_sigmas else prediction, zsnr=zsnr,
                            edm_sigmas=edm_sigmas,
                            vae_prefix=VAE_PREFIX if has_vae else None,
                            text_prefixes=find_text_prefixes(shapes, family))


def detect_unet_file(state: Mapping[str, torch.Tensor],
                     family_hint: str | None = None) -> CheckpointLayout:
    """Detect a standalone UNet file (LDM names, with or without model.diffusion_model.)."""
    shapes = shapes_of(state)
    prefix = UNET_PREFIX if UNET_PREFIX + "input_blocks.0.0.weight" in shapes else ""
    if not prefix and "conv_in.weight" in shapes and any(n.startswith("down_blocks.")
                                                         for n in shapes):
        raise UnknownLayoutError("this UNet is in the diffusers layout (down_blocks.*), which "
                                 "Loom does not load yet; use the original single-file "
                                 "checkpoint or an LDM-layout UNet file")
    unet = detect_unet(shapes, prefix, family_hint)
    prediction, zsnr = detect_prediction(state, str(unet["family"]), int(unet["in_channels"]),
                                         prefix)
    edm_sigmas = detect_edm_sigmas(state, str(unet["family"]))
    return CheckpointLayout(**unet, prediction="v" if edm_sigmas else prediction, zsnr=zsnr,
                            edm_sigmas=edm_sigmas, unet_prefix=prefix)
