"""Every choice of the model loaders' drop-downs works: UNETLoader's fp8 weight dtypes round
the weights as ComfyUI stores them, CLIPLoader's device option, and the text-encoder types."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from engine.diffusion.checkpoints.writer import random_checkpoint
from engine.diffusion.memory.devices import DevicePolicy
from engine.diffusion.memory.model_manager import COMPUTE_ROLE, ModelManager
from engine.validation import validate_prompt
from nodes.loaders import SUPPORTED_CLIP_TYPES, UNET_DTYPES
from tests.model_engine import ModelEngine, node, probed


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> ModelEngine:
    engine = ModelEngine(tmp_path_factory.mktemp("dropdowns"))
    tensors, metadata = random_checkpoint("sd15")
    unet = {name: value.contiguous() for name, value in tensors.items()
            if name.startswith("model.diffusion_model.")}
    folder = engine.base / "models" / "diffusion_models"
    folder.mkdir(parents=True)
    save_file(unet, str(folder / "tiny_unet.safetensors"), metadata=metadata)
    return engine


def load_unet(engine: ModelEngine, weight_dtype: str) -> torch.nn.Module:
    api = probed({"1": node("UNETLoader", unet_name="tiny_unet.safetensors",
                            weight_dtype=weight_dtype)}, "1")
    result, _ = engine.run(api)
    return result.values["1"][0][0].unet


@pytest.mark.parametrize("weight_dtype", UNET_DTYPES)
def test_every_unet_weight_dtype_loads(engine: ModelEngine, weight_dtype: str) -> None:
    assert load_unet(engine, weight_dtype).dtype == torch.float32


@pytest.mark.parametrize("weight_dtype, storage", [("fp8_e4m3fn", torch.float8_e4m3fn),
                                                    ("fp8_e4m3fn_fast", torch.float8_e4m3fn),
                                                    ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_weight_dtypes_hold_exactly_the_fp8_values(engine: ModelEngine, weight_dtype: str,
                                                       storage: torch.dtype) -> None:
    default = dict(load_unet(engine, "default").named_parameters())
    for name, param in load_unet(engine, weight_dtype).named_parameters():
        assert param.dtype == storage, name  # held in fp8, cast up layer by layer
        assert torch.equal(param.float(), default[name].to(storage).float()), name


def test_fp8_weights_change_the_prediction_a_little(engine: ModelEngine) -> None:
    default, rounded = load_unet(engine, "default"), load_unet(engine, "fp8_e4m3fn")
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 64)
    with torch.inference_mode():
        exact, approx = default(x, t, context), rounded(x, t, context)
    assert not torch.equal(exact, approx)
    assert torch.allclose(exact, approx, atol=0.5)


def test_text_encoder_types_of_other_families_fail_at_validation_saying_why(
        engine: ModelEngine) -> None:
    folder = engine.base / "models" / "text_encoders"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "t5.safetensors").write_bytes(b"")
    api = probed({"1": node("DualCLIPLoader", clip_name1="t5.safetensors",
                            clip_name2="t5.safetensors", type="flux")}, "1")
    error = validate_prompt(api, engine.registry, engine.services).node_errors["1"]["errors"][0]
    assert "'flux' belongs to a model family Loom does not run" in error["details"]
    assert "'stable_diffusion' or 'sdxl'" in error["details"]


def test_stable_diffusion_type_takes_the_sdxl_refiners_lone_bigg_file() -> None:
    assert SUPPORTED_CLIP_TYPES["stable_diffusion"] == ("sd1", "sd2", "sdxl_refiner")


def test_modules_marked_for_the_cpu_compute_there_whatever_the_policy() -> None:
    policy = DevicePolicy.decide(cuda_available=True, force_fp32=True)
    models = ModelManager(policy, vram=None)
    encoder = torch.nn.Linear(2, 2)
    assert models.compute_device_for(encoder) == torch.device("cuda")
    setattr(encoder, COMPUTE_ROLE, "cpu")
    assert models.compute_device_for(encoder) == torch.device("cpu")


def test_the_vae_follows_cpu_vae() -> None:
    from engine.diffusion.checkpoints.writer import TINY_VAE
    from engine.diffusion.networks.vae import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(TINY_VAE)
    policy = DevicePolicy.decide(cuda_available=True, cpu_vae=True)
    assert ModelManager(policy, vram=None).compute_device_for(vae) == torch.device("cpu")
    assert ModelManager(DevicePolicy.decide(cuda_available=True), vram=None
                        ).compute_device_for(vae) == torch.device("cuda")


