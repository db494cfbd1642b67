"""LoraLoader, LoraLoaderModelOnly and HypernetworkLoader through the engine on a tiny SD1.5
checkpoint: they change the conditioning and the model's output, strength 0 changes nothing,
LoRAs stack, files are parsed once, and unusable keys are shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from engine.diffusion.patches.model_handle import ModelHandle
from engine.diffusion.patches.patching import patched
from tests.model_engine import ModelEngine, node, probed

ATTN2_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
TEXT_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.fixture
def engine(tmp_path: Path) -> ModelEngine:
    return ModelEngine(tmp_path)


def randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def write_lora(engine: ModelEngine, name: str, seed: int, extra: dict[str, Tensor] | None = None
               ) -> str:
    tensors = {f"{ATTN2_K}.lora_up.weight": randn(32, 4, seed=seed),
               f"{ATTN2_K}.lora_down.weight": randn(4, 64, seed=seed + 1),
               f"{TEXT_Q}.lora_up.weight": randn(64, 4, seed=seed + 2),
               f"{TEXT_Q}.lora_down.weight": randn(4, 64, seed=seed + 3),
               **(extra or {})}
    folder = engine.base / "models" / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / name))
    return name


def unet_output(model: ModelHandle) -> Tensor:
    """The UNet's prediction on fixed inputs, under the handle's patches."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, model.config.context_dim, generator=generator)
    with torch.no_grad(), patched(model.unet, model.patches):
        return model.unet(x, torch.tensor([500.0]), context)


def sampled_workflow(ckpt: str, model: list[Any], clip: list[Any]) -> dict[str, Any]:
    return {"1": node("CheckpointLoaderSimple", ckpt_name=ckpt),
            "6": node("CLIPTextEncode", text="a red fox", clip=clip),
            "7": node("CLIPTextEncode", text="", clip=clip),
            "5": node("EmptyLatentImage", width=64, height=64, batch_size=1),
            "3": node("KSampler", model=model, seed=3, steps=2, cfg=6.0, sampler_name="euler",
                      scheduler="normal", positive=["6", 0], negative=["7", 0],
                      latent_image=["5", 0], denoise=1.0)}


def run_workflow(engine: ModelEngine, api: dict[str, Any]) -> tuple[Tensor, Tensor]:
    result, _ = engine.run(probed(api, "6", "3"))
    return result.values["6"][0][0][0][0], result.values["3"][0][0]["samples"]


def lora_node(name: str, model: list[Any], clip: list[Any], strength_model: float,
              strength_clip: float) -> dict[str, Any]:
    return node("LoraLoader", model=model, clip=clip, lora_name=name,
                strength_model=strength_model, strength_clip=strength_clip)


def test_lora_loader_changes_conditioning_and_samples_and_strength_zero_does_not(
        engine: ModelEngine) -> None:
    ckpt, lora = engine.checkpoint("sd15"), write_lora(engine, "style.safetensors", 1)
    plain = run_workflow(engine, sampled_workflow(ckpt, ["1", 0], ["1", 1]))
    api = sampled_workflow(ckpt, ["10", 0], ["10", 1])
    api["10"] = lora_node(lora, ["1", 0], ["1", 1], 1.0, 1.0)
    with_lora = run_workflow(engine, api)
    assert not torch.allclose(plain[0], with_lora[0]) and not torch.allclose(plain[1],
                                                                              with_lora[1])
    api["10"] = lora_node(lora, ["1", 0], ["1", 1], 0.0, 0.0)
    zero = run_workflow(engine, api)
    assert torch.equal(plain[0], zero[0]) and torch.equal(plain[1], zero[1])
    again = run_workflow(engine, sampled_workflow(ckpt, ["1", 0], ["1", 1]))
    assert torch.equal(plain[1], again[1])  # the shared network carries no LoRA afterwards


def test_two_chained_loras_stack(engine: ModelEngine) -> None:
    ckpt = engine.checkpoint("sd15")
    first, second = write_lora(engine, "a.safetensors", 1), write_lora(engine, "b.safetensors", 9)
    api = {"1": node("CheckpointLoaderSimple", ckpt_name=ckpt),
           "2": lora_node(first, ["1", 0], ["1", 1], 0.8, 1.0),
           "3": lora_node(second, ["2", 0], ["2", 1], 0.5, 0.7),
           "4": lora_node(first, ["1", 0], ["1", 1], 0.8, 1.0)}
    result, _ = engine.run(probed(api, "1", "2", "3", "4"))
    base, one, two = (result.values[n][0][0] for n in ("1", "2", "3"))
    assert (len(base.patches), len(one.patches), len(two.patches)) == (0, 1, 2)
    assert len(result.values["3"][1][0].patches["l"]) == 2
    outputs = [unet_output(model) for model in (base, one, two)]
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1],
                                                                              outputs[2])
    assert torch.equal(unet_output(base), outputs[0])
    loaded = engine.services.model_manager.stats()["loaded"]
    assert sorted(entry for entry in loaded if entry.endswith(":lora")) == ["a.safetensors:lora",
                                                                            "b.safetensors:lora"]


def test_model_only_loader_leaves_the_text_encoder_alone(engine: ModelEngine) -> None:
    ckpt, lora = engine.checkpoint("sd15"), write_lora(engine, "m.safetensors", 4)
    api = {"1": node("CheckpointLoaderSimple", ckpt_name=ckpt),
           "2": node("LoraLoaderModelOnly", model=["1", 0], lora_name=lora,
                     strength_model=1.0)}
    result, listener = engine.run(probed(api, "1", "2"))
    base, patched_model = result.values["1"][0][0], result.values["2"][0][0]
    assert not torch.allclose(unet_output(base), unet_output(patched_model))
    assert "2" not in result.outputs  # text keys are left out, not reported as foreign


def test_foreign_keys_are_shown_in_the_node_output(engine: ModelEngine) -> None:
    ckpt = engine.checkpoint("sd15")
    lora = write_lora(engine, "odd.safetensors", 2, {"not_a_lora.weight": randn(3, seed=0)})
    api = {"1": node("CheckpointLoaderSimple", ckpt_name=ckpt),
           "2": lora_node(lora, ["1", 0], ["1", 1], 1.0, 1.0)}
    result, _ = engine.run(probed(api, "2"))
    (summary,) = result.outputs["2"]["lora_report"]
    assert "1 keys matched nothing" in summary and "not_a_lora.weight" in summary


def write_hypernetwork(engine: ModelEngine, width: int) -> str:
    torch.manual_seed(0)
    pair = [nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))
            for _ in range(2)]
    data = {width: [{f"linear.{k}": v for k, v in mlp.state_dict().items()} for mlp in pair],
            "layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": False}
    folder = engine.base / "models" / "hypernetworks"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(data, folder / "hyper.pt")
    engine.services.model_manager.allow_pickle = True  # A1111's .pt: as --allow-pickle-checkpoints
    return "hyper.pt"


def test_hypernetwork_loader_changes_the_model_output_and_strength_zero_does_not(
        engine: ModelEngine) -> None:
    ckpt = engine.checkpoint("sd15")
    name = write_hypernetwork(engine, 64)
    api = {"1": node("CheckpointLoaderSimple", ckpt_name=ckpt),
           "2": node("HypernetworkLoader", model=["1", 0], hypernetwork_name=name, strength=1.0),
           "3": node("HypernetworkLoader", model=["1", 0], hypernetwork_name=name, strength=0.0)}
    result, _ = engine.run(probed(api, "1", "2", "3"))
    base, hooked, zero = (result.values[n][0][0] for n in ("1", "2", "3"))
    plain = unet_output(base)
    assert not torch.allclose(plain, unet_output(hooked))
    assert torch.equal(plain, unet_output(zero))
    assert torch.equal(plain, unet_output(base))
