"""ComfyUI's `comfy.sd` for custom-node packs: CLIP and VAE as packs see them, over Loom's
TextEncoderStack and VAE, and the loaders (through Loom's model manager, so a file loaded here
and by a Loom node is one copy)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from loom_lora_names import ClipWeight, clip_weights
from loom_weight_patches import WeightSlot, pack_weight_patch, record_patches

from comfy.model_patcher import ModelPatcher, UnsupportedPatchError
from engine.comfy_host import HOST
from engine.diffusion.checkpoints.loader import NODE_LATENT_SCALE, load_unet_file
from engine.diffusion.checkpoints.loader import load_checkpoint as load_checkpoint_file
from engine.diffusion.checkpoints.state_files import open_state_file
from engine.diffusion.checkpoints.text_encoders import load_text_encoder_files
from engine.diffusion.memory.model_manager import ModelKey
from engine.diffusion.networks.vae_model import VAE as LoomVAE
from engine.diffusion.patches.lora import apply_lora, parse_lora
from engine.diffusion.text.encoding import PromptTokens, TextEncoderStack
from engine.diffusion.text.prompt_weights import EmbeddingFolders


class CLIPType:
    """ComfyUI's CLIPType names (load_clip's clip_type); Loom loads SD1/SD2/SDXL encoders."""

    STABLE_DIFFUSION = 1
    STABLE_CASCADE = 2
    SD3 = 3
    STABLE_AUDIO = 4
    HUNYUAN_DIT = 5
    FLUX = 6


class ComfyTokens(dict):
    """`clip.tokenize(text)`: ComfyUI's {encoder: [[(token, weight), ...], ...]} dict, keeping
    Loom's tokenization so encoding it gives exactly Loom's CLIPTextEncode result."""

    def __init__(self, tokens: PromptTokens) -> None:
        super().__init__({name: [list(window) for window in windows]
                          for name, windows in tokens.windows.items()})
        self.loom_tokens = tokens


def _prompt_tokens(tokens: Mapping[str, Any]) -> PromptTokens:
    if isinstance(tokens, ComfyTokens):
        return tokens.loom_tokens
    windows = {name: tuple([(item[0], float(item[1])) for item in window]
                           for window in found) for name, found in tokens.items()}
    return PromptTokens(MappingProxyType(windows))


class CLIP:
    """CLIP for packs over a Loom TextEncoderStack (clip skip and patches included)."""

    def __init__(self, target: Any = None, embedding_directory: Any = None,
                 no_init: bool = False, stack: TextEncoderStack | None = None) -> None:
        if stack is None and not no_init:
            raise NotImplementedError("comfy.sd.CLIP(target=...): Loom builds text encoders "
                                      "from files; use comfy.sd.load_clip(ckpt_paths=[...])")
        self.stack = stack
        self.layer_idx: int | None = stack.layer_idx if stack is not None else None
        self.patches: dict[str, list[tuple[Any, ...]]] = {}

    @property
    def cond_stage_model(self) -> Any:
        return torch.nn.ModuleDict(dict(self._stack().encoders))

    @property
    def patcher(self) -> CLIP:
        return self

    @property
    def tokenizer(self) -> Any:
        return self._stack().tokenizers

    def _stack(self) -> TextEncoderStack:
        if self.stack is None:
            raise RuntimeError("this CLIP was made with no_init=True and holds no encoders")
        return self.stack

    def clone(self) -> CLIP:
        twin = CLIP(no_init=True, stack=self.stack)
        twin.layer_idx = self.layer_idx
        twin.patches = {key: list(found) for key, found in self.patches.items()}
        return twin

    def clip_layer(self, layer_idx: int) -> None:
        self.layer_idx = layer_idx

    def add_patches(self, patches: Mapping[str, Any], strength_patch: float = 1.0,
                    strength_model: float = 1.0) -> list[str]:
        """Record weight patches keyed by get_sd's names or by ComfyUI's ("clip_l.transformer.
        text_model....weight", what comfy.lora's key maps give); the keys this CLIP has are
        returned (as in ComfyUI, other keys are ignored). They apply while the CLIP encodes."""
        return record_patches(self.patches, patches, self.weight_slots, strength_patch,
                              strength_model)

    @functools.cached_property
    def weight_slots(self) -> Mapping[str, ClipWeight]:
        """Every name add_patches takes -> where it lies (buffers such as position ids are no
        weights); built once per CLIP value, as block-weight loaders patch weight by weight."""
        encoders = self._stack().encoders
        slots = {f"{name}.{key}": ClipWeight(name, key) for name, module in encoders.items()
                 for key, _ in module.named_parameters()}
        return MappingProxyType(slots | clip_weights(encoders))

    def loom_value(self) -> TextEncoderStack:
        stack = self._stack().clone_with_layer(self.layer_idx)
        if not self.patches:
            return stack
        slots = self.weight_slots
        by_encoder: dict[str, dict[str, list[Any]]] = {}
        for key, entries in self.patches.items():
            by_encoder.setdefault(slots[key].encoder, {})[key] = entries

        def slot(key: str) -> WeightSlot:
            found = slots[key]
            return WeightSlot(found.param, found.rows, found.transposed)

        return stack.clone_with_patches({name: pack_weight_patch(found, slot)
                                         for name, found in by_encoder.items()})

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs: Any) -> ComfyTokens:
        return ComfyTokens(self.loom_value().tokenize(text))

    def encode_from_tokens(self, tokens: Mapping[str, Any], return_pooled: Any = False,
                           return_dict: bool = False) -> Any:
        encoded = self.loom_value().encode_tokens(_prompt_tokens(tokens))
        if return_dict:
            return {"cond": encoded.cond, "pooled_output": encoded.pooled}
        return (encoded.cond, encoded.pooled) if return_pooled else encoded.cond

    def encode_from_tokens_scheduled(self, tokens: Mapping[str, Any], unmerged: bool = False,
                                     add_dict: Mapping[str, Any] | None = None
                                     ) -> list[list[Any]]:
        found = self.encode_from_tokens(tokens, return_dict=True)
        options = {"pooled_output": found["pooled_output"], **(add_dict or {})}
        return [[found["cond"], options]]

    def encode(self, text: str) -> torch.Tensor:
        return self.encode_from_tokens(self.tokenize(text))

    def get_sd(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{key}": value for name, module in self._stack().encoders.items()
                for key, value in module.state_dict().items()}

    def load_sd(self, sd: Mapping[str, torch.Tensor], full_model: bool = False) -> Any:
        raise NotImplementedError("CLIP.load_sd: Loom loads text encoders from files; use "
                                  "comfy.sd.load_clip(ckpt_paths=[...])")

    def load_model(self) -> CLIP:
        return self

    def get_key_patches(self) -> dict[str, list[Any]]:
        """Each weight as ComfyUI lists it, (weight, convert_func) first, then its patches."""
        if any(self._stack().patches.values()):
            raise UnsupportedPatchError(
                "CLIP.get_key_patches on a CLIP carrying Loom weight patches (LoRA, merges): "
                "merge the CLIPs before applying LoRA, or use Loom's CLIPMerge nodes")
        return {key: [(value, _unchanged)] + list(self.patches.get(key, []))
                for key, value in self.get_sd().items()}


class VAE:
    """VAE for packs over a Loom VAE (images [B, H, W, C] in 0..1 <-> raw latents)."""

    def __init__(self, sd: Mapping[str, torch.Tensor] | None = None, device: Any = None,
                 config: Any = None, dtype: Any = None, metadata: Any = None,
                 vae: LoomVAE | None = None) -> None:
        if vae is None:
            if sd is None:
                raise ValueError("comfy.sd.VAE needs sd= (a VAE state dict)")
            policy = HOST.require_services("comfy.sd.VAE").model_manager.policy
            vae = LoomVAE.from_state_dict(  # a pack's dtype= is converted to, as ComfyUI
                sd, latent_scale=NODE_LATENT_SCALE, dtype=dtype or policy.vae_dtype,
                device=policy.offload_device,
                hold_file_dtype=dtype is None and policy.vae_holding.file_dtype)
        self.vae = vae
        self.downscale_ratio = vae.downscale
        self.upscale_ratio = vae.downscale
        self.latent_channels = vae.latent_channels
        self.latent_dim = 2
        self.output_channels = 3
        self.vae_dtype = vae.dtype
        self.output_device = vae.output_device

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def first_stage_model(self) -> torch.nn.Module:
        return self.vae.module

    @property
    def patcher(self) -> VAE:
        return self

    def loom_value(self) -> LoomVAE:
        return self.vae

    def decode(self, samples_in: torch.Tensor, vae_options: Any = None) -> torch.Tensor:
        return self.vae.decode(samples_in)

    def encode(self, pixel_samples: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixel_samples[..., :3])

    def decode_tiled(self, samples: torch.Tensor, tile_x: int = 64, tile_y: int = 64,
                     overlap: int = 16, tile_t: Any = None, overlap_t: Any = None
                     ) -> torch.Tensor:
        """ComfyUI's sizes are in latent cells; Loom's tiler takes pixels (square tiles)."""
        ratio = self.downscale_ratio
        return self.vae.decode_tiled(samples, tile_size=max(tile_x, tile_y) * ratio,
                                     overlap=overlap * ratio)

    def encode_tiled(self, pixel_samples: torch.Tensor, tile_x: int = 512, tile_y: int = 512,
                     overlap: int = 64, tile_t: Any = None, overlap_t: Any = None
                     ) -> torch.Tensor:
        return self.vae.encode_tiled(pixel_samples[..., :3], tile_size=max(tile_x, tile_y),
                                     overlap=overlap)

    def spacial_compression_decode(self) -> int:
        return self.upscale_ratio

    def spacial_compression_encode(self) -> int:
        return self.downscale_ratio

    def temporal_compression_decode(self) -> None:
        return None

    def memory_used_decode(self, shape: Any, dtype: torch.dtype) -> int:
        return int(2178 * shape[2] * shape[3] * 64 * torch.finfo(dtype).bits // 8)

    def memory_used_encode(self, shape: Any, dtype: torch.dtype) -> int:
        return int(1767 * shape[1] * shape[2] * torch.finfo(dtype).bits // 8)

    def get_sd(self) -> dict[str, torch.Tensor]:
        return self.vae.module.state_dict()


def _models() -> Any:
    return HOST.require_services("comfy.sd").model_manager


def _embedding_finder() -> EmbeddingFolders:
    paths = HOST.require_services("comfy.sd").paths
    return EmbeddingFolders(tuple(paths.folder_dirs("embeddings")))


def load_checkpoint_guess_config(ckpt_path: str, output_vae: bool = True,
                                 output_clip: bool = True, output_clipvision: bool = False,
                                 embedding_directory: Any = None, output_model: bool = True,
                                 model_options: Any = None, te_model_options: Any = None
                                 ) -> tuple[Any, Any, Any, Any]:
    """(MODEL, CLIP, VAE, CLIP_VISION) of a single-file checkpoint; CLIP_VISION is None."""
    models = _models()
    path = Path(ckpt_path)

    def build() -> Any:
        opened = open_state_file(path, allow_pickle=models.allow_pickle)
        loaded = load_checkpoint_file(opened, models.policy, models.bpe.get(),
                                 find_embedding=_embedding_finder())
        return loaded.model, loaded.clip, loaded.vae

    model, clip, vae = models.load(ModelKey.for_file(path, "checkpoint", models.policy), build)
    return (ModelPatcher(model) if output_model and model is not None else None,
            CLIP(stack=clip) if output_clip and clip is not None else None,
            VAE(vae=vae) if output_vae and vae is not None else None, None)


def load_checkpoint(config_path: Any = None, ckpt_path: Any = None, output_vae: bool = True,
                    output_clip: bool = True, embedding_directory: Any = None,
                    state_dict: Any = None, config: Any = None) -> tuple[Any, Any, Any]:
    if ckpt_path is None:
        raise NotImplementedError("comfy.sd.load_checkpoint with a state dict: Loom loads "
                                  "checkpoints from files; pass ckpt_path")
    return load_checkpoint_guess_config(ckpt_path, output_vae, output_clip)[:3]


def load_diffusion_model(unet_path: str, model_options: Any = None) -> ModelPatcher:
    models = _models()
    path = Path(unet_path)

    def build() -> Any:
        return load_unet_file(open_state_file(path, allow_pickle=models.allow_pickle),
                              models.policy)

    return ModelPatcher(models.load(ModelKey.for_file(path, "unet", models.policy), build))


def load_unet(unet_path: str, dtype: Any = None) -> ModelPatcher:
    return load_diffusion_model(unet_path)


def load_clip(ckpt_paths: list[str], embedding_directory: Any = None, clip_type: Any = None,
              model_options: Any = None) -> CLIP:
    models = _models()
    paths = [Path(p) for p in ckpt_paths]

    def build() -> Any:
        opened = [open_state_file(p, allow_pickle=models.allow_pickle).tensors for p in paths]
        return load_text_encoder_files(opened, models.bpe.get(),
                                       find_embedding=_embedding_finder(),
                                       holding=models.policy.text_holding,
                                       device=models.policy.offload_device)

    key = ModelKey.for_file(paths[0], "text_encoders", *[str(p) for p in paths[1:]])
    return CLIP(stack=models.load(key, build))


def load_lora_for_models(model: Any, clip: Any, lora: Mapping[str, torch.Tensor],
                         strength_model: float, strength_clip: float) -> tuple[Any, Any]:
    """Clones of MODEL and CLIP with a LoRA state dict applied (Loom's LoRA patches)."""
    parsed = parse_lora(lora)
    handle = model.loom_value() if model is not None else None
    stack = clip.loom_value() if clip is not None else None
    new_model, new_clip, _ = apply_lora(handle, stack, parsed, strength_model, strength_clip)
    return (ModelPatcher(new_model) if new_model is not None else None,
            CLIP(stack=new_clip) if new_clip is not None else None)


def _unchanged(weight: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """ComfyUI's convert_func for a weight stored as it is used."""
    return weight
