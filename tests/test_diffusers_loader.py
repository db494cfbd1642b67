"""DiffusersLoader: diffusers model folders (unet/, vae/, text_encoder(s)/ in diffusers and HF
naming, with their config.json) load as the same MODEL, CLIP and VAE as the single-file
checkpoint they were written from; the writer's folders match what diffusers and transformers
build from those configs, name for name and shape for shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine.diffusion.checkpoints.diffusers_unet import (
    diffusers_unet_config,
    diffusers_unet_to_ldm,
    ldm_unet_to_diffusers,
    unet_config_from_diffusers,
)
from engine.diffusion.checkpoints.diffusers_writer import (
    ldm_vae_to_diffusers,
    text_encoder_json,
    vae_config,
    write_random_diffusers,
)
from engine.diffusion.checkpoints.loader import strip_prefix
from engine.diffusion.checkpoints.text_encoders import hf_text_encoder_state
from engine.diffusion.checkpoints.writer import RECIPES, random_checkpoint, text_config, unet_config
from engine.diffusion.networks.clip_text import ClipTextModel
from engine.diffusion.networks.openclip_text import OpenClipTextModel
from tests.model_engine import ModelEngine, node, probed

KINDS = ("sd15", "sd21v", "sdxl_base", "sdxl_refiner")
FAMILY = {"sd15": "sd1", "sd21v": "sd2", "sdxl_base": "sdxl", "sdxl_refiner": "sdxl_refiner"}


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


def public(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if not key.startswith("_")}


# --- layout against diffusers / transformers -----------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_full_size_unet_is_diffusers_unet2dconditionmodel(kind: str) -> None:
    from diffusers import UNet2DConditionModel

    tensors, _ = random_checkpoint(kind, tiny=False, meta=True)
    config = unet_config(RECIPES[kind], False)
    ours = ldm_unet_to_diffusers(strip_prefix(tensors, "model.diffusion_model."), config, kind)
    with torch.device("meta"):
        reference = UNet2DConditionModel(**public(diffusers_unet_config(config)))
    assert shapes(ours) == shapes(reference.state_dict())


@pytest.mark.parametrize("kind", ["sd15", "sdxl_base"])
def test_full_size_vae_is_diffusers_autoencoderkl(kind: str) -> None:
    from diffusers import AutoencoderKL

    tensors, _ = random_checkpoint(kind, tiny=False, meta=True)
    vae = strip_prefix(tensors, "first_stage_model.")
    with torch.device("meta"):
        reference = AutoencoderKL(**public(vae_config(vae, FAMILY[kind])))
    assert shapes(ldm_vae_to_diffusers(vae)) == shapes(reference.state_dict())


@pytest.mark.parametrize("encoder_kind", ["l", "h", "g"])
def test_full_size_text_encoders_are_transformers_clip_text_models(encoder_kind: str) -> None:
    transformers = pytest.importorskip("transformers")
    config = text_config(encoder_kind, False)
    projected = encoder_kind == "g"
    fields = public(text_encoder_json(config, projected))
    fields.pop("architectures")
    model_class = (transformers.CLIPTextModelWithProjection if projected
                   else transformers.CLIPTextModel)
    with torch.device("meta"):
        ours = (ClipTextModel if encoder_kind == "l" else OpenClipTextModel)(config)
        reference = model_class(transformers.CLIPTextConfig(**fields))
    # (transformers 5 leaves `text_model.` out of a plain CLIPTextModel's state dict; the
    # released files and Loom's reader have it either way)
    expected = {k.removeprefix("text_model."): v for k, v in shapes(reference.state_dict()).items()
                if not k.endswith("position_ids")}
    written = {k.removeprefix("text_model."): v
               for k, v in shapes(hf_text_encoder_state(ours)).items()}
    if encoder_kind == "h":  # SD2's folder holds a plain CLIPTextModel: no projection
        written.pop("text_projection.weight")
    assert written == expected


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tiny", [True, False])
def test_unet_config_survives_config_json(kind: str, tiny: bool) -> None:
    config = unet_config(RECIPES[kind], tiny)
    assert unet_config_from_diffusers(diffusers_unet_config(config), kind) == config


@pytest.mark.parametrize("kind", KINDS)
def test_unet_names_round_trip(kind: str) -> None:
    tensors, _ = random_checkpoint(kind, meta=True)
    config = unet_config(RECIPES[kind], True)
    ldm = strip_prefix(tensors, "model.diffusion_model.")
    back = diffusers_unet_to_ldm(ldm_unet_to_diffusers(ldm, config, kind), config, kind)
    assert shapes(back) == shapes(ldm)


# --- the node ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> ModelEngine:
    engine = ModelEngine(tmp_path_factory.mktemp("diffusers"))
    folder = engine.base / "models" / "diffusers"
    for kind in ("sd15", "sdxl_base"):
        engine.checkpoint(kind, f"{kind}.safetensors", seed=3)
        write_random_diffusers(folder / "org" / kind, kind, seed=3)
    (folder / "not_a_model").mkdir()
    (folder / "not_a_model" / "readme.txt").write_text("no model_index.json here")
    return engine


def test_folders_with_a_model_index_are_listed(engine: ModelEngine) -> None:
    assert engine.services.paths.list_files("diffusers") == ["org/sd15", "org/sdxl_base"]


def loaded(engine: ModelEngine, kind: str) -> tuple[Any, Any]:
    """(DiffusersLoader's outputs, CheckpointLoaderSimple's on the same-seed file)."""
    api = {"folder": node("DiffusersLoader", model_path=f"org/{kind}"),
           "file": node("CheckpointLoaderSimple", ckpt_name=f"{kind}.safetensors")}
    for slot in range(3):
        api[f"folder{slot}"] = node("Probe", value=["folder", slot])
        api[f"file{slot}"] = node("Probe", value=["file", slot])
    result, _ = engine.run(api)
    values = result.values
    return ([values["folder"][slot][0] for slot in range(3)],
            [values["file"][slot][0] for slot in range(3)])


def same_state(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["sd15", "sdxl_base"])
def test_a_folder_loads_the_model_of_its_checkpoint(engine: ModelEngine, kind: str) -> None:
    (model, clip, vae), (file_model, file_clip, file_vae) = loaded(engine, kind)
    assert model.family == file_model.family
    assert type(model.sampling) is type(file_model.sampling)
    assert model.config == file_model.config and same_state(model.unet, file_model.unet)
    assert clip.family == file_clip.family and clip.encoders.keys() == file_clip.encoders.keys()
    for name, encoder in clip.encoders.items():
        ours, theirs = encoder.state_dict(), file_clip.encoders[name].state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs if k != "logit_scale")
    assert same_state(vae.module, file_vae.module)


def test_a_folder_samples_the_same_image_as_its_checkpoint(engine: ModelEngine) -> None:
    def image(loader: dict[str, Any]) -> torch.Tensor:
        api = {"load": loader,
               "pos": node("CLIPTextEncode", text="a cat", clip=["load", 1]),
               "neg": node("CLIPTextEncode", text="", clip=["load", 1]),
               "empty": node("EmptyLatentImage", width=64, height=64, batch_size=1),
               "sample": node("KSampler", model=["load", 0], seed=1, steps=2, cfg=5.0,
                              sampler_name="euler", scheduler="normal", positive=["pos", 0],
                              negative=["neg", 0], latent_image=["empty", 0], denoise=1.0),
               "decode": node("VAEDecode", samples=["sample", 0], vae=["load", 2])}
        result, _ = engine.run(probed(api, "decode"))
        return result.values["decode"][0][0]

    ours = image(node("DiffusersLoader", model_path="org/sd15"))
    assert torch.equal(ours, image(node("CheckpointLoaderSimple", ckpt_name="sd15.safetensors")))


def test_a_folder_without_text_encoder_weights_names_what_is_missing(tmp_path: Path) -> None:
    from engine.diffusion.checkpoints.diffusers_folder import load_diffusers_folder
    from engine.diffusion.checkpoints.state_files import CheckpointError
    from tests.diffusion.controlnet_testing import FP32_CPU

    folder = write_random_diffusers(tmp_path / "broken", "sd15")
    (folder / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no text_encoder weights .*model\.safetensors"):
        load_diffusers_folder(folder, FP32_CPU, None)
