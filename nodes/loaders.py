"""Model loaders: checkpoints, diffusion models, VAEs and text encoders, from the model folders.

Every loader goes through the process's model manager (ctx.models), so a file loaded by two
nodes or two prompts is one copy in memory. Fingerprints use size + mtime: an edited or
replaced file is noticed without hashing gigabytes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import torch

from engine.context import NodeContext
from engine.diffusion.checkpoints.diffusers_folder import load_diffusers_folder, weight_files
from engine.diffusion.checkpoints.loader import (
    checkpoint_weight_bytes,
    load_checkpoint,
    load_unet_file,
    load_vae_file,
)
from engine.diffusion.checkpoints.safetensors_io import ReadRule, SafetensorsFile, weight_bytes
from engine.diffusion.checkpoints.state_files import open_state_file
from engine.diffusion.checkpoints.text_encoders import load_text_encoder_files
from engine.diffusion.memory.cast_on_use import Holding
from engine.diffusion.memory.devices import DevicePolicy, storage_dtype
from engine.diffusion.memory.model_manager import COMPUTE_ROLE, ModelKey, ModelManager
from engine.diffusion.networks.vae_model import VAE
from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.text.encoding import TextEncoderStack
from engine.diffusion.text.prompt_weights import EmbeddingFolders
from engine.node import Combo, FilesIn, Node, NodeSchema, Output

T = TypeVar("T")
UNET_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
# UNETLoader's weight dtypes -> the dtype the weights are held in (memory.devices: computed in
# the policy's UNet dtype; "_fast" only changes ComfyUI's GPU matmul kernel).
UNET_STORAGE = MappingProxyType({"fp8_e4m3fn": "float8_e4m3fn",
                                 "fp8_e4m3fn_fast": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"})
CLIP_TYPES = ("stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv",
              "pixart", "cosmos", "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2",
              "qwen_image", "hunyuan_image", "flux2", "ovis")
DUAL_CLIP_TYPES = ("sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image",
                   "hunyuan_video_15", "kandinsky5", "kandinsky5_image", "ltxv", "newbie")
# Types whose text encoders Loom runs -> the families they may hold (a lone bigG file under
# "stable_diffusion" is the SDXL refiner's CLIP, as in ComfyUI).
SUPPORTED_CLIP_TYPES = {"stable_diffusion": ("sd1", "sd2", "sdxl_refiner"), "sdxl": ("sdxl",)}


def file_fingerprint(ctx: NodeContext, folder: str, name: str) -> Any:
    """(size, mtime) of a model file; a missing file fingerprints as such (run reports it)."""
    try:
        stat = ctx.paths.find_file(folder, name).stat()
    except (OSError, ValueError):
        return ("missing", name)
    return (stat.st_size, stat.st_mtime_ns)


def manager(ctx: NodeContext) -> ModelManager:
    models = ctx.models
    if not isinstance(models, ModelManager):
        raise RuntimeError("no model manager was configured for this process; model nodes "
                           "need one (main.py creates it)")
    return models


def embedding_finder(ctx: NodeContext) -> EmbeddingFolders:
    return EmbeddingFolders(tuple(ctx.paths.folder_dirs("embeddings")))


def load_model_file(ctx: NodeContext, folder: str, name: str, component: str,
                    build: Callable[[ModelManager, Path], T], *options: Any,
                    size: Callable[[ModelManager, Path], int] | None = None) -> T:
    """The file `name` of a model folder, built once per (file, component, options) and then
    shared through the model manager; `size` (the bytes the built weights take) lets the
    manager evict others to make room before it builds."""
    models = manager(ctx)
    path = ctx.paths.find_file(folder, name)
    return models.load(ModelKey.for_file(path, component, *options),
                       lambda: build(models, path),
                       None if size is None else lambda: size(models, path))


def header_size(rule_of: Callable[[DevicePolicy], ReadRule]
                ) -> Callable[[ModelManager, Path], int]:
    """A `size` for load_model_file: the file's floating tensors as the load keeps them (read by
    `rule_of(policy)`: a dtype or a Holding), from a safetensors header without reading the
    weights. Other formats give 0 (their size is only known once read): the manager then makes
    room after."""
    def size(models: ModelManager, path: Path) -> int:
        return files_bytes([path], rule_of(models.policy))
    return size


def files_bytes(paths: list[Path], rule: ReadRule) -> int:
    """Bytes of the floating tensors of the safetensors files `paths` once read by `rule`."""
    return sum(weight_bytes(SafetensorsFile(path), {"": rule})
               for path in paths if path.suffix == ".safetensors")


def load_checkpoint_file(ctx: NodeContext, ckpt_name: str) -> tuple[ModelHandle, Any, Any]:
    """(MODEL, CLIP, VAE) of a checkpoint in the checkpoints folder, shared via the manager."""
    def build(models: ModelManager, path: Path) -> tuple[ModelHandle, Any, Any]:
        opened = open_state_file(path, allow_pickle=models.allow_pickle)
        loaded = load_checkpoint(opened, models.policy, ctx.services.bpe.get(),
                                 find_embedding=embedding_finder(ctx))
        return loaded.model, loaded.clip, loaded.vae

    def size(models: ModelManager, path: Path) -> int:
        opened = open_state_file(path, allow_pickle=models.allow_pickle)
        return checkpoint_weight_bytes(opened, models.policy)

    return load_model_file(ctx, "checkpoints", ckpt_name, "checkpoint", build,
                           manager(ctx).policy, size=size)


class CheckpointLoaderSimple(Node):
    schema = NodeSchema(
        "CheckpointLoaderSimple", (Combo("ckpt_name", FilesIn("checkpoints")),),
        (Output("MODEL"), Output("CLIP"), Output("VAE")), category="loaders",
        display_name="Load Checkpoint",
        description="Loads a single-file checkpoint (SD1.x, SD2.x, SDXL base or refiner); "
                    "the layout is detected from the file.")

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        return file_fingerprint(ctx, "checkpoints", inputs["ckpt_name"])

    def execute(self, ctx: NodeContext, ckpt_name: str) -> tuple[Any, Any, Any]:
        return load_checkpoint_file(ctx, ckpt_name)


class CheckpointLoader(Node):
    """The deprecated variant with a YAML config: the config is not needed (the layout is
    detected from the weights), so it is accepted and ignored."""

    schema = NodeSchema(
        "CheckpointLoader",
        (Combo("config_name", FilesIn("configs")), Combo("ckpt_name", FilesIn("checkpoints"))),
        (Output("MODEL"), Output("CLIP"), Output("VAE")), category="advanced/loaders",
        display_name="Load Checkpoint With Config (DEPRECATED)", deprecated=True)

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        return file_fingerprint(ctx, "checkpoints", inputs["ckpt_name"])

    def execute(self, ctx: NodeContext, config_name: str, ckpt_name: str) -> tuple[Any, Any, Any]:
        return load_checkpoint_file(ctx, ckpt_name)


class UNETLoader(Node):
    schema = NodeSchema(
        "UNETLoader", (Combo("unet_name", FilesIn("diffusion_models")),
                       Combo("weight_dtype", UNET_DTYPES)),
        (Output("MODEL"),), category="advanced/loaders", display_name="Load Diffusion Model")

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        return file_fingerprint(ctx, "diffusion_models", inputs["unet_name"])

    def execute(self, ctx: NodeContext, unet_name: str, weight_dtype: str) -> tuple[ModelHandle]:
        """fp8 weight dtypes hold the weights in fp8, cast up to the compute dtype layer by
        layer (memory/cast_on_use.py), as ComfyUI does."""
        storage = UNET_STORAGE.get(weight_dtype)
        held = storage_dtype(storage) if storage else None
        return (load_model_file(
            ctx, "diffusion_models", unet_name, "unet",
            lambda models, path: load_unet_file(
                open_state_file(path, allow_pickle=models.allow_pickle), models.policy, held),
            manager(ctx).policy, weight_dtype,
            size=header_size(lambda policy: held or policy.unet_holding)),)


class VAELoader(Node):
    schema = NodeSchema("VAELoader", (Combo("vae_name", FilesIn("vae")),), (Output("VAE"),),
                        category="loaders", display_name="Load VAE")

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        return file_fingerprint(ctx, "vae", inputs["vae_name"])

    def execute(self, ctx: NodeContext, vae_name: str) -> tuple[VAE]:
        return (load_model_file(
            ctx, "vae", vae_name, "vae",
            lambda models, path: load_vae_file(
                open_state_file(path, allow_pickle=models.allow_pickle), models.policy),
            manager(ctx).policy, size=header_size(lambda policy: policy.vae_holding)),)


def load_text_encoders(ctx: NodeContext, names: list[str], clip_type: str,
                       device: str = "default") -> TextEncoderStack:
    """CLIPLoader/DualCLIPLoader: text encoder files -> a CLIP handle of a supported family.
    `device` "cpu" runs them on the CPU in fp32 (weights held in the policy's text dtype, as
    ComfyUI's CPU text encoders)."""
    models = manager(ctx)
    policy = models.policy
    paths = [ctx.paths.find_file("text_encoders", name) for name in names]
    key = ModelKey(";".join(str(p) for p in paths), sum(p.stat().st_size for p in paths),
                   max(p.stat().st_mtime_ns for p in paths), "text_encoders",
                   (policy, clip_type, device))
    on_cpu = device == "cpu" and policy.device.type != "cpu"
    holding = cpu_text_holding(policy) if on_cpu else policy.text_holding

    def load() -> TextEncoderStack:
        opened = [open_state_file(p, allow_pickle=models.allow_pickle).tensors for p in paths]
        clip = load_text_encoder_files(opened, ctx.services.bpe.get(),
                                       find_embedding=embedding_finder(ctx), holding=holding,
                                       device=policy.offload_device)
        if on_cpu:
            for encoder in clip.encoders.values():
                setattr(encoder, COMPUTE_ROLE, "cpu")
        if clip.family not in SUPPORTED_CLIP_TYPES[clip_type]:
            raise ValueError(f"the file(s) {names} hold a {clip.family} text encoder, which "
                             f"does not fit type {clip_type!r}")
        return clip

    return models.load(key, load, lambda: files_bytes(paths, holding))


def cpu_text_holding(policy: DevicePolicy) -> Holding:
    """CLIPLoader's device "cpu" on a GPU policy: computed in fp32, the weights held in the
    policy's text dtype (as ComfyUI's CPU text encoders) or, with a storage flag, in that."""
    return Holding(torch.float32, policy.text_storage_dtype or policy.text_dtype)


def _clip_type_error(clip_type: str) -> tuple[str, str] | None:
    """Types of model families Loom does not run (Flux, SD3, video, audio ...) are listed
    because saved workflows name them; choosing one fails here, saying why."""
    if clip_type in SUPPORTED_CLIP_TYPES:
        return None
    return ("type", f"text encoder type {clip_type!r} belongs to a model family Loom does not "
                    f"run (Loom runs Stable Diffusion 1.x, 2.x and XL); use "
                    f"{' or '.join(repr(t) for t in SUPPORTED_CLIP_TYPES)} with SD text "
                    f"encoder files")


def _text_fingerprint(ctx: NodeContext, names: list[str]) -> Any:
    return tuple(file_fingerprint(ctx, "text_encoders", name) for name in names)


class CLIPLoader(Node):
    schema = NodeSchema(
        "CLIPLoader", (Combo("clip_name", FilesIn("text_encoders")), Combo("type", CLIP_TYPES),
                       Combo("device", ("default", "cpu"), optional=True,
                             options={"advanced": True})),
        (Output("CLIP"),), category="advanced/loaders", display_name="Load CLIP")

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        return _text_fingerprint(ctx, [inputs["clip_name"]])

    def validate(self, ctx: NodeContext, **inputs: Any) -> tuple[str, str] | None:
        return _clip_type_error(inputs.get("type", ""))

    def execute(self, ctx: NodeContext, clip_name: str, type: str,
                device: str = "default") -> tuple[TextEncoderStack]:
        return (load_text_encoders(ctx, [clip_name], type, device),)


class DualCLIPLoader(Node):
    schema = NodeSchema(
        "DualCLIPLoader",
        (Combo("clip_name1", FilesIn("text_encoders")),
         Combo("clip_name2", FilesIn("text_encoders")), Combo("type", DUAL_CLIP_TYPES),
         Combo("device", ("default", "cpu"), optional=True, options={"advanced": True})),
        (Output("CLIP"),), category="advanced/loaders", display_name="DualCLIPLoader")

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        return _text_fingerprint(ctx, [inputs["clip_name1"], inputs["clip_name2"]])

    def validate(self, ctx: NodeContext, **inputs: Any) -> tuple[str, str] | None:
        return _clip_type_error(inputs.get("type", ""))

    def execute(self, ctx: NodeContext, clip_name1: str, clip_name2: str, type: str,
                device: str = "default") -> tuple[TextEncoderStack]:
        return (load_text_encoders(ctx, [clip_name1, clip_name2], type, device),)


class DiffusersLoader(Node):
    """A diffusers model folder under models/diffusers (one holding a model_index.json) ->
    MODEL, CLIP and VAE (engine/diffusion/checkpoints/diffusers_folder.py)."""

    schema = NodeSchema(
        "DiffusersLoader", (Combo("model_path", FilesIn("diffusers")),),
        (Output("MODEL"), Output("CLIP"), Output("VAE")),
        category="advanced/loaders/deprecated", display_name="DiffusersLoader")

    def fingerprint(self, ctx: NodeContext, **inputs: Any) -> Any:
        try:
            files = weight_files(ctx.paths.find_folder("diffusers", inputs["model_path"]))
            return tuple((f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        except (OSError, ValueError):
            return ("missing", inputs["model_path"])

    def execute(self, ctx: NodeContext, model_path: str) -> tuple[Any, Any, Any]:
        models = manager(ctx)
        folder = ctx.paths.find_folder("diffusers", model_path)
        files = weight_files(folder)
        key = ModelKey(str(folder.resolve()), sum(f.stat().st_size for f in files),
                       max(f.stat().st_mtime_ns for f in files), "diffusers", (models.policy,))
        return models.load(key, lambda: load_diffusers_folder(
            folder, models.policy, ctx.services.bpe.get(), find_embedding=embedding_finder(ctx),
            allow_pickle=models.allow_pickle))


NODE_TYPES = (CheckpointLoaderSimple, CheckpointLoader, UNETLoader, VAELoader, CLIPLoader,
              DualCLIPLoader, DiffusersLoader)
