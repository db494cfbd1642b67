"""Tiny stand-in model files named as an API prompt's loaders ask, for bench/example_workflows.

Each file is written in the real key layout of its kind with the engine's writers (checkpoints,
ControlNets, T2I-Adapters, GLIGEN, upscalers) or, for the small add-on formats the writers do not
cover (VAE, LoRA, hypernetwork, embedding, CLIP vision), built here from a tiny checkpoint's
shapes so that it fits the model it is applied to."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor, nn

from engine.diffusion.checkpoints.controlnet_loader import DIFF_MARKER
from engine.diffusion.checkpoints.controlnet_writer import (
    random_controlnet,
    random_t2i_adapter,
    write_random_controlnet,
)
from engine.diffusion.checkpoints.loader import UNET_CONFIG_KEY
from engine.diffusion.checkpoints.state_files import PICKLE_SUFFIXES
from engine.diffusion.checkpoints.writer import (
    RECIPES,
    TINY_BIGG,
    random_checkpoint,
    random_upscaler,
    randomize,
    unet_config,
    write_random_checkpoint,
    write_random_gligen,
)
from engine.diffusion.networks.clip_vision import ClipVisionModel, VisionConfig
from engine.diffusion.networks.unet import UNet

# Checkpoint kind by a released model's file name, first match wins; anything else is SD1.5.
CHECKPOINT_KINDS = (("refiner", "sdxl_refiner"), ("xl_edit", "sdxl_edit"),
                    ("unclip", "sd21_unclip_h"), ("inpainting", "sd15_inpaint"),
                    ("xl", "sdxl_base"), ("v2-1", "sd21v"), ("wd-illusion", "sd21v"))
FAMILY_OF_KIND = {"sd15": "sd15", "sd15_inpaint": "sd15", "sd21v": "sd21v",
                  "sd21_unclip_h": "sd21v", "sdxl_base": "sdxl_base",
                  "sdxl_refiner": "sdxl_base", "sdxl_edit": "sdxl_base"}
EMBEDDING = re.compile(r"embedding:([^\s,()]+)")
LORA_RANK = 4
UNET_PREFIX = "model.diffusion_model."


def checkpoint_kind(name: str, class_type: str) -> str:
    if class_type == "unCLIPCheckpointLoader" and "unclip" not in name.lower():
        return "sd21_unclip_h"
    lowered = name.lower()
    return next((kind for part, kind in CHECKPOINT_KINDS if part in lowered), "sd15")


def as_safetensors(name: str) -> str:
    """`name` with a pickle suffix replaced by .safetensors (tiny configs live in metadata)."""
    path = Path(name)
    return str(path.with_suffix(".safetensors")) if path.suffix.lower() in PICKLE_SUFFIXES \
        else name


def is_adapter_name(name: str) -> bool:
    return "t2iadapter" in name.lower() or "t2i_adapter" in name.lower()


def four_level_checkpoint(kind: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A tiny `kind` checkpoint whose UNet has the released four resolution levels (the tiny
    one has fewer), so that a T2I-Adapter's four feature maps have blocks to go to."""
    tensors, metadata = random_checkpoint(kind)
    config = dataclasses.replace(unet_config(RECIPES[kind], True), channel_mult=(1, 2, 4, 4),
                                 transformer_depth=(1, 1, 1, 0))
    unet = UNet(config)
    randomize(unet, torch.Generator().manual_seed(0))
    kept = {key: value for key, value in tensors.items() if not key.startswith(UNET_PREFIX)}
    kept.update({UNET_PREFIX + key: value for key, value in unet.state_dict().items()})
    return kept, {**metadata, UNET_CONFIG_KEY: json.dumps(dataclasses.asdict(config))}


def small_normals(shape: tuple[int, ...], seed: int, scale: float = 0.02) -> Tensor:
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def save(path: Path, tensors: dict[str, Tensor] | Any, metadata: dict[str, str] | None = None
         ) -> None:
    """safetensors, or a torch pickle when the name asks for one (the user's real file type)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        torch.save(tensors, path)
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


class StandIns:
    """Writes every file an API prompt names under `base` (models/, input/), and renames the
    prompt's pickle checkpoints to their .safetensors stand-ins."""

    def __init__(self, base: Path, image_size: int) -> None:
        self.base = base
        self.image_size = image_size
        self.family = "sd15"
        self.adapter = False  # a T2I-Adapter needs the released four-level UNet structure
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}

    def provide(self, api: dict[str, Any]) -> None:
        kinds = [checkpoint_kind(str(body["inputs"].get("ckpt_name")), body["class_type"])
                 for body in api.values() if "ckpt_name" in body.get("inputs", {})]
        families = {FAMILY_OF_KIND[kind] for kind in kinds}
        self.family = next((f for f in ("sdxl_base", "sd21v") if f in families), "sd15")
        self.adapter = any(is_adapter_name(str(body["inputs"].get("control_net_name", "")))
                           for body in api.values())
        for body in api.values():
            self._node(body["class_type"], body.get("inputs", {}))

    def _node(self, class_type: str, inputs: dict[str, Any]) -> None:
        writers: dict[str, Callable[[str, str], str | None]] = {
            "ckpt_name": self.checkpoint, "vae_name": self.vae, "lora_name": self.lora,
            "control_net_name": self.controlnet, "model_name": self.upscaler,
            "hypernetwork_name": self.hypernetwork, "clip_name": self.clip_vision,
            "image": self.image, "gligen_name": self.gligen,
        }
        for name, value in list(inputs.items()):
            if isinstance(value, str) and name in writers:
                renamed = writers[name](value, class_type)
                if renamed:
                    inputs[name] = renamed
            if isinstance(value, str) and name in ("text", "text_g", "text_l"):
                for embedding in EMBEDDING.findall(value):
                    self.embedding(embedding)

    def _models(self, folder: str, name: str) -> Path:
        return self.base / "models" / folder / name

    def shapes(self, kind: str) -> dict[str, tuple[int, ...]]:
        if kind not in self._shapes:
            tensors, _ = random_checkpoint(kind, meta=True)
            self._shapes[kind] = {key: tuple(value.shape) for key, value in tensors.items()}
        return self._shapes[kind]

    def checkpoint(self, name: str, class_type: str) -> str:
        if class_type not in ("CheckpointLoaderSimple", "CheckpointLoader",
                              "unCLIPCheckpointLoader"):
            return name
        stored = as_safetensors(name)
        kind = checkpoint_kind(name, class_type)
        if self.adapter and kind in ("sd15", "sd21v"):
            save(self._models("checkpoints", stored), *four_level_checkpoint(kind))
        else:
            write_random_checkpoint(self._models("checkpoints", stored), kind)
        return stored

    def vae(self, name: str, class_type: str) -> None:
        tensors, _ = random_checkpoint("sd15")
        prefix = "first_stage_model."
        vae = {key[len(prefix):]: value for key, value in tensors.items()
               if key.startswith(prefix)}
        path = self._models("vae", name)
        save(path, {"state_dict": vae} if path.suffix.lower() in PICKLE_SUFFIXES else vae)

    def controlnet(self, name: str, class_type: str) -> str:
        kind = "sdxl_base" if self.family == "sdxl_base" else self.family
        if is_adapter_name(name):
            save(self._models("controlnet", name), random_t2i_adapter("full"))
            return name
        stored = as_safetensors(name)
        path = self._models("controlnet", stored)
        if class_type == "DiffControlNetLoader":
            tensors, metadata = random_controlnet(kind)
            deltas = {key: 0.01 * value for key, value in tensors.items()}
            save(path, {**deltas, DIFF_MARKER: torch.zeros(0)}, metadata)
        else:
            write_random_controlnet(path, kind)
        return stored

    def gligen(self, name: str, class_type: str) -> str:
        stored = as_safetensors(name)
        write_random_gligen(self._models("gligen", stored), self.family)
        return stored

    def upscaler(self, name: str, class_type: str) -> None:
        if class_type == "UpscaleModelLoader":
            save(self._models("upscale_models", name), random_upscaler("esrgan"))

    def lora(self, name: str, class_type: str) -> None:
        """Rank-4 LoRA (kohya names over the LDM keys) on every cross-attention projection and
        the first text-encoder layer's query."""
        tensors: dict[str, Tensor] = {}
        for seed, (key, shape) in enumerate(sorted(self.shapes(self.family).items())):
            target = self._lora_target(key)
            if target is None or len(shape) != 2:
                continue
            tensors[f"{target}.lora_up.weight"] = small_normals((shape[0], LORA_RANK), seed)
            tensors[f"{target}.lora_down.weight"] = small_normals((LORA_RANK, shape[1]), -seed)
            tensors[f"{target}.alpha"] = torch.tensor(float(LORA_RANK))
        save(self._models("loras", name), tensors)

    def _lora_target(self, key: str) -> str | None:
        if key.startswith(UNET_PREFIX) and re.search(r"attn2\.to_[kv]\.weight$", key):
            return "lora_unet_" + key[len(UNET_PREFIX):-len(".weight")].replace(".", "_")
        text = re.search(r"transformer\.(text_model\.encoder\.layers\.0\.self_attn\.q_proj)"
                         r"\.weight$", key)
        if text:
            prefix = "lora_te1_" if self.family == "sdxl_base" else "lora_te_"
            return prefix + text.group(1).replace(".", "_")
        return None

    def hypernetwork(self, name: str, class_type: str) -> None:
        """A1111 layout: {width: [k-module, v-module]} for each attention input width."""
        widths = {shape[1] for key, shape in self.shapes(self.family).items()
                  if key.endswith(("attn1.to_k.weight", "attn2.to_k.weight"))}
        data: dict[Any, Any] = {"layer_structure": [1, 2, 1], "activation_func": "relu",
                                "is_layer_norm": False}
        generator = torch.Generator().manual_seed(0)
        for width in sorted(widths):
            pair = [nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(),
                                  nn.Linear(2 * width, width)) for _ in range(2)]
            for module in pair:
                randomize(module, generator)
            data[width] = [{f"linear.{k}": 0.1 * v for k, v in m.state_dict().items()}
                           for m in pair]
        save(self._models("hypernetworks", name), data)

    def clip_vision(self, name: str, class_type: str) -> None:
        """A CLIP vision tower (HF names) whose image embedding is as wide as the pooled text
        the SDXL model expects (revision), or the unCLIP model's."""
        if class_type != "CLIPVisionLoader":
            return
        projection = TINY_BIGG.width if self.family == "sdxl_base" else 32
        tower = ClipVisionModel(VisionConfig(width=64, layers=2, heads=1, mlp_width=128,
                                             patch_size=14, image_size=28,
                                             projection_dim=projection, activation="gelu"))
        randomize(tower, torch.Generator().manual_seed(0))
        save(self._models("clip_vision", name), dict(tower.state_dict()))

    def embedding(self, reference: str) -> None:
        """A textual-inversion embedding of 2 vectors for the workflow's text encoders."""
        name = reference if Path(reference).suffix else reference + ".safetensors"
        path = self._models("embeddings", name)
        if self.family == "sdxl_base":
            vectors = {"clip_l": small_normals((2, 64), 1), "clip_g": small_normals((2, 128), 2)}
            save(path, vectors)
            return
        save(path, {"string_to_param": {"*": small_normals((2, 64), 1)}, "name": reference})

    def image(self, name: str, class_type: str) -> None:
        if class_type not in ("LoadImage", "LoadImageMask"):
            return
        path = self.base / "input" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        size = self.image_size
        picture = Image.new("RGBA", (size, size), (128, 128, 128, 255))
        picture.paste((90, 160, 220, 0), (size // 4, size // 4, size // 2, size // 2))
        picture.save(path)
