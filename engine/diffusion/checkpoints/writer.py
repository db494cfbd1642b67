"""Random checkpoints in the real single-file layouts, for tests, demos and benchmarks.

`full` size reproduces the released files' key/dtype/shape sets exactly (shared/formats lists
them); `tiny` keeps every key name and the structure but with small widths, and records its
UNet config in the safetensors metadata so the loader rebuilds exactly that network."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from engine.diffusion.checkpoints.detect import V_PRED_PROBE
from engine.diffusion.checkpoints.gligen_loader import HEADS_METADATA_KEY
from engine.diffusion.checkpoints.loader import FAMILY_KEY, UNET_CONFIG_KEY
from engine.diffusion.checkpoints.unclip import UNCLIP_VISION_PREFIX, hf_to_openclip_visual
from engine.diffusion.networks.attention import SpatialTransformer
from engine.diffusion.networks.clip_text import CLIP_L_CONFIG, ClipTextModel, TextEncoderConfig
from engine.diffusion.networks.clip_vision import ClipVisionModel, VisionConfig
from engine.diffusion.networks.gligen import Gligen, GligenConfig
from engine.diffusion.networks.openclip_text import VIT_BIGG_CONFIG, VIT_H_CONFIG, OpenClipTextModel
from engine.diffusion.networks.unet import ADM_NUMBER_DIM, UNet, UNetConfig, UNetFamily
from engine.diffusion.networks.upscalers import import_spandrel
from engine.diffusion.networks.vae import AutoencoderKL, VAEConfig

KINDS = ("sd15", "sd15_inpaint", "sd21v", "sd21_unclip_h", "sdxl_base", "sdxl_refiner",
         "sdxl_edit", "sd_x4_upscaler", "lotus_d")
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                    "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")
LOW_SCALE_PREFIX = "low_scale_model."
# Small text encoders: widths are multiples of the released 64-wide heads.
TINY_CLIP_L = TextEncoderConfig(width=64, layers=2, heads=1, mlp_width=128,
                                activation="quick_gelu")
TINY_VIT_H = TextEncoderConfig(width=64, layers=2, heads=1, mlp_width=128, activation="gelu",
                               projection_dim=64)
TINY_BIGG = TextEncoderConfig(width=128, layers=2, heads=2, mlp_width=256, activation="gelu",
                              projection_dim=128)
# 32 channels and 3 downsamplings: tiny, but 8 pixels per latent cell like the real VAE.
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
# The x4 upscaler's KL-f4 VAE (2 downsamplings), released and tiny.
X4_VAE = VAEConfig(ch_mult=(1, 2, 4))
TINY_X4_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1)
SD_BETAS = (0.00085, 0.012)


@dataclass(frozen=True)
class Recipe:
    """What one checkpoint kind is made of."""

    family: UNetFamily
    in_channels: int
    text: tuple[tuple[str, str], ...]   # (key prefix, encoder kind: l | h | g)
    dtype: torch.dtype
    schedule: bool = False
    model_ema: bool = False
    position_ids: str | None = None     # key of the CLIP-L position_ids buffer, if stored
    v_prediction: bool = False
    unclip: bool = False                # a CLIP vision tower under embedder.model.visual.
    edm_vpred: tuple[float, float] | None = None  # CosXL's marker: (sigma_min, sigma_max)
    vae: tuple[VAEConfig, VAEConfig] | None = (VAEConfig(), TINY_VAE)  # (released, tiny)
    betas: tuple[float, float] = SD_BETAS  # the schedule buffers' linear_start, linear_end
    low_scale: bool = False             # the x4 upscaler's noise augmentor buffers
    unet_prefix: str = "model.diffusion_model."  # "" for a diffusion-model-only file


RECIPES = {
    "sd15": Recipe(UNetFamily.SD1, 4, (("cond_stage_model.transformer.text_model.", "l"),),
                   torch.float32, schedule=True, model_ema=True,
                   position_ids="cond_stage_model.transformer.text_model.embeddings."
                                "position_ids"),
    "sd21v": Recipe(UNetFamily.SD2, 4, (("cond_stage_model.model.", "h"),), torch.float32,
                    schedule=True, v_prediction=True),
    "sdxl_base": Recipe(UNetFamily.SDXL, 4,
                        (("conditioner.embedders.0.transformer.text_model.", "l"),
                         ("conditioner.embedders.1.model.", "g")), torch.float16,
                        position_ids="conditioner.embedders.0.transformer.text_model."
                                     "embeddings.position_ids"),
    "sdxl_refiner": Recipe(UNetFamily.SDXL_REFINER, 4,
                           (("conditioner.embedders.0.model.", "g"),), torch.float16),
}
FAMILIES = {UNetFamily.SD1: "sd1", UNetFamily.SD2: "sd2", UNetFamily.SDXL: "sdxl",
            UNetFamily.SDXL_REFINER: "sdxl_refiner"}
RECIPES["sd15_inpaint"] = dataclasses.replace(RECIPES["sd15"], in_channels=9)
RECIPES["sd21_unclip_h"] = dataclasses.replace(RECIPES["sd21v"], unclip=True)
# CosXL edit: an instruct-pix2pix SDXL (8 input channels) with EDM v-prediction.
RECIPES["sdxl_edit"] = dataclasses.replace(RECIPES["sdxl_base"], in_channels=8,
                                           edm_vpred=(0.002, 120.0))
# stabilityai's x4-upscaler-ema (tests/data/formats/sd_x4_upscaler.tsv): SD2's text tower, a
# 7-channel UNet and a KL-f4 VAE, the DDPM buffers of its 0.0001..0.02 schedule.
RECIPES["sd_x4_upscaler"] = Recipe(UNetFamily.SD_X4, 7, (("cond_stage_model.model.", "h"),),
                                   torch.float32, schedule=True, vae=(X4_VAE, TINY_X4_VAE),
                                   betas=(0.0001, 0.02), low_scale=True)
# Lotus-D as ComfyUI loads it with UNETLoader: the UNet alone, LDM names without a prefix.
RECIPES["lotus_d"] = Recipe(UNetFamily.LOTUS, 4, (), torch.float16, vae=None, unet_prefix="")
FAMILIES[UNetFamily.SD_X4] = "sd_x4"
FAMILIES[UNetFamily.LOTUS] = "lotus"
# The released unCLIP-H tower is OpenCLIP ViT-H/14 (1280 wide, 1024-dim image embeddings).
FULL_UNCLIP_VISION = VisionConfig(width=1280, layers=32, heads=16, mlp_width=5120, patch_size=14,
                                  image_size=224, projection_dim=1024, activation="gelu")
TINY_UNCLIP_VISION = VisionConfig(width=64, layers=2, heads=1, mlp_width=128, patch_size=14,
                                  image_size=28, projection_dim=32, activation="gelu")


def text_config(kind: str, tiny: bool) -> TextEncoderConfig:
    full = {"l": CLIP_L_CONFIG, "h": VIT_H_CONFIG, "g": VIT_BIGG_CONFIG}
    small = {"l": TINY_CLIP_L, "h": TINY_VIT_H, "g": TINY_BIGG}
    return (small if tiny else full)[kind]


def unet_config(recipe: Recipe, tiny: bool) -> UNetConfig:
    """The released layout, or the tiny one resized to the tiny text encoders' widths."""
    if not tiny:
        config = UNetConfig.preset(recipe.family, in_channels=recipe.in_channels)
        if recipe.unclip:
            config = dataclasses.replace(config,
                                         adm_in_channels=2 * FULL_UNCLIP_VISION.projection_dim)
        return config
    widths = {kind: text_config(kind, True).width for _, kind in recipe.text}
    config = UNetConfig.tiny(recipe.family, in_channels=recipe.in_channels)
    if not widths:  # no text encoder in the file: the context keeps the released width
        return dataclasses.replace(config, context_dim=UNetConfig.preset(recipe.family).
                                   context_dim)
    context = sum(widths.values())
    adm = None
    if recipe.family == UNetFamily.SDXL:
        adm = widths["g"] + 6 * ADM_NUMBER_DIM
    elif recipe.family == UNetFamily.SDXL_REFINER:
        adm = widths["g"] + 5 * ADM_NUMBER_DIM
    elif recipe.unclip:  # noised image embedding + its noise level's embedding
        adm = 2 * TINY_UNCLIP_VISION.projection_dim
    else:
        adm = config.adm_in_channels
    return dataclasses.replace(config, context_dim=context, adm_in_channels=adm)


def schedule_buffers(linear_start: float = SD_BETAS[0], linear_end: float = SD_BETAS[1]
                     ) -> dict[str, Tensor]:
    """The 12 LDM training-schedule buffers of SD1/SD2 files (scaled-linear betas)."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, 1000,
                           dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    cumprod = torch.cumprod(alphas, 0)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), cumprod[:-1]])
    variance = betas * (1.0 - previous) / (1.0 - cumprod)
    values = {
        "betas": betas, "alphas_cumprod": cumprod, "alphas_cumprod_prev": previous,
        "sqrt_alphas_cumprod": cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1 / cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / cumprod - 1).sqrt(),
        "posterior_variance": variance,
        "posterior_log_variance_clipped": variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * previous.sqrt() / (1 - cumprod),
        "posterior_mean_coef2": (1 - previous) * alphas.sqrt() / (1 - cumprod),
    }
    return {name: values[name].float() for name in SCHEDULE_BUFFERS}


def random_weights(module: nn.Module, generator: torch.Generator,
                   dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
    """(name, value) of deterministic random weights for each parameter of `module`, drawn one
    at a time (so a meta-device module works and only one fp32 draw exists at once): fan-in
    scaled normals, norms near 1, small biases; cast to `dtype` when given."""
    for name, param in module.named_parameters():
        draw = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if param.ndim >= 2:
            value = draw / math.sqrt(math.prod(param.shape[1:]))
        elif "norm" in name or name.split(".")[-2:-1] in (["ln_1"], ["ln_2"], ["ln_final"]):
            value = 1.0 + 0.1 * draw if name.endswith("weight") else 0.1 * draw
        else:
            value = 0.02 * draw
        yield name, value if dtype is None else value.to(dtype)


def randomize(module: nn.Module, generator: torch.Generator) -> None:
    """Give `module` the random weights of `random_weights`, in place."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in random_weights(module, generator):
            params[name].copy_(value)


def _components(recipe: Recipe, tiny: bool) -> Iterator[tuple[str, nn.Module]]:
    yield recipe.unet_prefix, UNet(unet_config(recipe, tiny))
    if recipe.vae is not None:
        yield "first_stage_model.", AutoencoderKL(recipe.vae[1] if tiny else recipe.vae[0])
    for prefix, kind in recipe.text:
        config = text_config(kind, tiny)
        yield prefix, ClipTextModel(config) if kind == "l" else OpenClipTextModel(config)


def random_checkpoint(kind: str, *, tiny: bool = True, seed: int = 0, meta: bool = False,
                      dtype: torch.dtype | None = None,
                      ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a random checkpoint of `kind` (one of KINDS), its weights in
    `dtype` (default: the released file's). With `meta` the tensors are shape-only (no memory,
    no values): for checking layouts."""
    if kind not in RECIPES:
        raise ValueError(f"unknown checkpoint kind {kind!r}; use one of {KINDS}")
    recipe = RECIPES[kind]
    dtype = dtype or recipe.dtype
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    with torch.device("meta"):  # full-size SDXL in fp32 would need 14 GB: draw per tensor
        components = list(_components(recipe, tiny))
    for prefix, module in components:
        weights = (((name, param.to(dtype)) for name, param in module.named_parameters())
                   if meta else random_weights(module, generator, dtype))
        tensors.update((prefix + name, value) for name, value in weights)
    if recipe.unclip:
        tensors.update(_unclip_vision(tiny, generator, meta))
    _add_extras(tensors, recipe, generator)
    metadata = {"loom.kind": kind, "loom.size": "tiny" if tiny else "full",
                FAMILY_KEY: FAMILIES[recipe.family]}
    if tiny:
        metadata[UNET_CONFIG_KEY] = json.dumps(dataclasses.asdict(unet_config(recipe, True)))
    return tensors, metadata


def _unclip_vision(tiny: bool, generator: torch.Generator, meta: bool) -> dict[str, Tensor]:
    """An unCLIP checkpoint's CLIP vision tower, in OpenCLIP naming under its prefix."""
    with torch.device("meta" if meta else "cpu"):
        tower = ClipVisionModel(TINY_UNCLIP_VISION if tiny else FULL_UNCLIP_VISION)
    if not meta:
        randomize(tower, generator)
    return {UNCLIP_VISION_PREFIX + key: value for key, value
            in hf_to_openclip_visual(tower.state_dict()).items()}


def _add_extras(tensors: dict[str, Tensor], recipe: Recipe, generator: torch.Generator
                ) -> None:
    """The non-weight tensors the released files carry (loaders must not need them)."""
    if recipe.schedule:
        tensors.update(schedule_buffers(*recipe.betas))
    if recipe.low_scale:  # ImageConcatWithNoiseAugmentation's first 8 buffers, same schedule
        tensors.update({LOW_SCALE_PREFIX + name: value for name, value
                        in schedule_buffers(*recipe.betas).items()
                        if name in SCHEDULE_BUFFERS[:8]})
    if recipe.model_ema:
        tensors["model_ema.decay"] = torch.tensor(0.9999, dtype=torch.float32)
        tensors["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    if recipe.position_ids:
        tensors[recipe.position_ids] = torch.arange(77, dtype=torch.int64).unsqueeze(0)
    if recipe.edm_vpred:
        tensors["edm_vpred.sigma_min"] = torch.tensor(recipe.edm_vpred[0])
        tensors["edm_vpred.sigma_max"] = torch.tensor(recipe.edm_vpred[1])
    if recipe.v_prediction:
        probe = "model.diffusion_model." + V_PRED_PROBE
        if probe in tensors:  # the released 768-v file's probe bias has a wide spread
            spread = 0.2 * torch.randn(tensors[probe].shape, generator=generator)
            tensors[probe] = spread.to(tensors[probe].dtype)
        else:  # tiny networks have no such block: mark v-prediction as re-saved files do
            tensors["v_pred"] = torch.zeros(0)


def random_gligen(kind: str = "sd15", *, tiny: bool = True, seed: int = 0
                  ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a random text-box GLIGEN for checkpoint `kind`, in the original
    key layout: a fuser under every transformer block of that UNet
    (`input_blocks.1.1.transformer_blocks.0.fuser.*` ...) and `position_net.*`. The gates
    (alpha_attn, alpha_dense) are drawn in 0.3..1, so every fuser changes its block's output."""
    recipe = RECIPES[kind]
    unet_layout = unet_config(recipe, tiny)
    with torch.device("meta"):
        unet = UNet(unet_layout)
    blocks = [(f"{name}.transformer_blocks.{index}", block.attn1.heads,
               block.attn1.heads * block.attn1.dim_head)
              for name, module in unet.named_modules() if isinstance(module, SpatialTransformer)
              for index, block in enumerate(module.transformer_blocks)]
    phrase = text_config(recipe.text[-1][1], tiny).width  # the pooled-from encoder's width
    config = GligenConfig(tuple(width for _, _, width in blocks), unet_layout.context_dim,
                          phrase, tuple(heads for _, heads, _ in blocks))
    network = Gligen(config)
    generator = torch.Generator().manual_seed(seed)
    randomize(network, generator)
    with torch.no_grad():
        for fuser in network.fusers:
            for gate in (fuser.alpha_attn, fuser.alpha_dense):
                gate.copy_(0.3 + 0.7 * torch.rand((), generator=generator))
    tensors = {}
    for name, value in network.state_dict().items():
        if name.startswith("fusers."):
            _, index, leaf = name.split(".", 2)
            name = f"{blocks[int(index)][0]}.fuser.{leaf}"
        tensors[name] = value
    metadata = {"loom.kind": f"gligen_{kind}", "loom.size": "tiny" if tiny else "full"}
    if tiny:
        metadata[HEADS_METADATA_KEY] = json.dumps(list(config.heads))
    return tensors, metadata


def write_random_gligen(path: Path, kind: str = "sd15", *, tiny: bool = True,
                        seed: int = 0) -> Path:
    """Write a random GLIGEN for checkpoint `kind` to `path` (.safetensors)."""
    return write_tensors(path, *random_gligen(kind, tiny=tiny, seed=seed))


def write_random_checkpoint(path: Path, kind: str, *, tiny: bool = True, seed: int = 0,
                            dtype: torch.dtype | None = None) -> Path:
    """Write a random `kind` checkpoint to `path` (.safetensors), its weights in `dtype`
    (default: the released file's), and return the path."""
    return write_tensors(path, *random_checkpoint(kind, tiny=tiny, seed=seed, dtype=dtype))


def write_tensors(path: Path, tensors: Mapping[str, Tensor],
                  metadata: Mapping[str, str] | None = None) -> Path:
    """Save `tensors` (made contiguous) to the .safetensors `path`, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path),
              metadata=dict(metadata) if metadata else None)
    return path


def main(argv: list[str] | None = None) -> None:
    """`python -m engine.diffusion.checkpoints.writer PATH [KIND] [--full] [--seed N]`."""
    import argparse

    parser = argparse.ArgumentParser(description="Write a random checkpoint in a real layout "
                                                 "(for trying the pipeline without weights).")
    parser.add_argument("path", type=Path)
    parser.add_argument("kind", nargs="?", default="sd15", choices=KINDS)
    parser.add_argument("--full", action="store_true", help="released size (GBs) not tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"),
                        help="weight dtype (default: the released file's, fp32 for SD1/SD2, "
                             "fp16 for SDXL)")
    args = parser.parse_args(argv)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
             None: None}[args.dtype]
    written = write_random_checkpoint(args.path, args.kind, tiny=not args.full, seed=args.seed,
                                      dtype=dtype)
    print(f"wrote {written} ({args.kind}, {'full size' if args.full else 'tiny'})")


if __name__ == "__main__":
    main()


def _upscaler_architectures() -> dict[str, Callable[[], nn.Module]]:
    """Tiny instances of the upscaler architectures (spandrel's classes, so their key layouts
    are the released files')."""
    import_spandrel()
    from spandrel.architectures.Compact.__arch.SRVGG import SRVGGNetCompact
    from spandrel.architectures.DAT.__arch.DAT import DAT
    from spandrel.architectures.ESRGAN.__arch.RRDB import RRDBNet
    from spandrel.architectures.HAT.__arch.HAT import HAT
    from spandrel.architectures.OmniSR.__arch.OmniSR import OmniSR
    from spandrel.architectures.SPAN.__arch.span import SPAN
    from spandrel.architectures.SwinIR.__arch.SwinIR import SwinIR

    swin = {"embed_dim": 12, "depths": [1], "num_heads": [2], "window_size": 4, "upscale": 2,
            "upsampler": "pixelshuffle", "img_size": 16}
    return {
        "esrgan": lambda: RRDBNet(num_filters=8, num_blocks=1, scale=4),
        "compact": lambda: SRVGGNetCompact(num_feat=8, num_conv=2, upscale=2),
        "span": lambda: SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2),
        "swinir": lambda: SwinIR(**swin),
        "hat": lambda: HAT(**swin, compress_ratio=3, squeeze_factor=4),
        "dat": lambda: DAT(embed_dim=30, depth=[2], num_heads=[2], split_size=[2, 4],
                           upscale=2, img_size=16, expansion_factor=2),
        "omnisr": lambda: OmniSR(num_feat=8, block_num=1, window_size=4, up_scale=2),
    }


UPSCALER_KINDS = ("esrgan", "compact", "span", "swinir", "hat", "dat", "omnisr")


def random_upscaler(kind: str, seed: int = 0) -> dict[str, Tensor]:
    """A tiny random upscale model of architecture `kind` (UPSCALER_KINDS), as its state dict."""
    architectures = _upscaler_architectures()
    if kind not in architectures:
        raise ValueError(f"unknown upscaler kind {kind!r}; use one of {UPSCALER_KINDS}")
    module = architectures[kind]()
    randomize(module, torch.Generator().manual_seed(seed))
    return {name: value.detach().clone().contiguous()
            for name, value in module.state_dict().items()}
