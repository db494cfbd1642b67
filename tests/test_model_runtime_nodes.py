"""ModelComputeDtype and TorchCompileModel (nodes/model_runtime.py) on a real tiny UNet: the
references are twins of the UNet converted with `.to(dtype)` and the plain uncompiled model."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor

from engine.diffusion.networks.unet import UNet, UNetFamily
from engine.diffusion.patches.model_handle import SD1_LATENT, ModelHandle
from engine.diffusion.patches.model_wrappers import CompiledForward, ComputeDtype
from engine.diffusion.sampling import model_sampling
from engine.diffusion.sampling.guidance import Guider
from engine.diffusion.sampling.ksampler import sample
from nodes.model_runtime import ModelComputeDtype, TorchCompileModel
from tests.diffusion.test_guidance import inputs_for
from tests.diffusion.test_unet import tiny_unet


def handle_for(unet: UNet) -> ModelHandle:
    return ModelHandle(unet, unet.config, "sd1", model_sampling("eps"), SD1_LATENT,
                       next(unet.parameters()).dtype, torch.device("cpu"))


def prompts(unet: UNet) -> tuple[Any, Any]:
    context = torch.randn(1, 7, unet.config.context_dim, generator=torch.Generator().manual_seed(4))
    return [[context, {}]], [[context * 0.5, {}]]


def predict(model: ModelHandle, cfg: float = 3.0) -> Tensor:
    positive, negative = prompts(model.unet)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return Guider(model, positive, negative, cfg).prepare(inputs_for((1, 4, 8, 8)))(
            x, torch.full((1,), 2.0))


def test_compute_dtype_returns_a_clone_and_leaves_the_given_model_alone() -> None:
    model = handle_for(tiny_unet(UNetFamily.SD1))
    before = {name: p.clone() for name, p in model.unet.named_parameters()}
    (half,) = ModelComputeDtype().execute(None, model, dtype="fp16")
    predict(half)
    assert isinstance(half.model_patches.model_function_wrapper, ComputeDtype)
    assert half.dtype == torch.float16 and half.unet is model.unet
    assert model.model_patches.model_function_wrapper is None and model.dtype == torch.float32
    assert all(torch.equal(p, before[name]) for name, p in model.unet.named_parameters())


@pytest.mark.parametrize(("name", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_compute_dtype_runs_the_unet_as_a_copy_converted_to_that_dtype(
        name: str, dtype: torch.dtype) -> None:
    unet = tiny_unet(UNetFamily.SD1)
    (patched,) = ModelComputeDtype().execute(None, handle_for(unet), dtype=name)
    reference = predict(handle_for(copy.deepcopy(unet).to(dtype)))
    out = predict(patched)
    assert out.dtype == torch.float32
    assert torch.allclose(out, reference, atol=1e-6)
    assert not torch.allclose(out, predict(handle_for(unet)), atol=1e-6)


def test_compute_dtype_default_drops_an_earlier_choice() -> None:
    model = handle_for(tiny_unet(UNetFamily.SD1))
    (half,) = ModelComputeDtype().execute(None, model, dtype="fp16")
    (back,) = ModelComputeDtype().execute(None, half, dtype="default")
    assert back.model_patches.model_function_wrapper is None and back.dtype == torch.float32
    assert torch.equal(predict(back), predict(model))


def test_compute_dtype_keeps_the_wrapper_set_before_it() -> None:
    unet = tiny_unet(UNetFamily.SD1)

    def doubled(apply: Any, args: dict[str, Any]) -> Tensor:
        return apply(args["input"], args["timestep"], **args["c"]) * 2

    model = handle_for(unet).patching(lambda p: p.with_model_function_wrapper(doubled))
    (half,) = ModelComputeDtype().execute(None, model, dtype="fp16")
    twin = handle_for(copy.deepcopy(unet).to(torch.float16))
    reference = predict(twin.patching(lambda p: p.with_model_function_wrapper(doubled)))
    assert torch.allclose(predict(half), reference, atol=1e-6)


def test_compute_dtype_fp32_on_fp32_weights_changes_nothing() -> None:
    model = handle_for(tiny_unet(UNetFamily.SD1))
    (same,) = ModelComputeDtype().execute(None, model, dtype="fp32")
    assert torch.equal(predict(same), predict(model))


def test_torch_compile_returns_a_clone_and_compiles_nothing_yet() -> None:
    model = handle_for(tiny_unet(UNetFamily.SD1))
    (compiled,) = TorchCompileModel().execute(None, model, backend="inductor")
    wrapper = compiled.model_patches.model_function_wrapper
    assert isinstance(wrapper, CompiledForward) and wrapper.backend == "inductor"
    assert compiled.unet is model.unet and model.model_patches.model_function_wrapper is None
    assert "forward" not in model.unet.__dict__  # swapped in only while the wrapper runs


def test_torch_compile_rejects_an_unknown_backend() -> None:
    model = handle_for(tiny_unet(UNetFamily.SD1))
    with pytest.raises(ValueError, match="TorchCompileModel: unknown backend 'eager'"):
        TorchCompileModel().execute(None, model, backend="eager")


def sampled(model: ModelHandle) -> Tensor:
    positive, negative = prompts(model.unet)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with torch.no_grad():
        out = sample(model, positive, negative, latent, seed=3, steps=3, cfg=4.0,
                     sampler_name="euler", scheduler="normal")
    return out.samples


@pytest.mark.slow  # inductor compiles C++ kernels: ~5 minutes on 2 busy cores
@pytest.mark.parametrize("backend", ["inductor", "cudagraphs"])
def test_compiled_model_samples_the_same_latent_as_the_uncompiled_one(backend: str) -> None:
    torch._dynamo.reset()
    model = handle_for(tiny_unet(UNetFamily.SD1))
    (compiled,) = TorchCompileModel().execute(None, model, backend=backend)
    out = sampled(compiled)
    assert "forward" not in model.unet.__dict__
    reference = sampled(model)  # fused kernels round differently: compare to the peak value
    assert (out - reference).abs().max() <= 2e-5 * reference.abs().max()
