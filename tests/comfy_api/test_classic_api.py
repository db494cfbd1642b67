"""Classic pack nodes using comfy.*, nodes and latent_preview run and match Loom's own nodes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine.validation import validate_prompt
from tests.model_engine import ModelEngine, node, probed

SIZE = 64


def checkpoint(engine: ModelEngine) -> str:
    name = "tiny_sd15.safetensors"
    if not (engine.base / "models" / "checkpoints" / name).exists():
        engine.checkpoint("sd15", name)
    return name


def base(engine: ModelEngine) -> dict[str, Any]:
    return {"ckpt": node("CheckpointLoaderSimple", ckpt_name=checkpoint(engine)),
            "pos": node("CLIPTextEncode", text="a red fox", clip=["ckpt", 1]),
            "neg": node("CLIPTextEncode", text="blurry", clip=["ckpt", 1]),
            "empty": node("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=1)}


def ksampler(model: list[Any], **settings: Any) -> dict[str, Any]:
    inputs = {"model": model, "seed": 7, "steps": 2, "cfg": 6.0, "sampler_name": "euler",
              "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0],
              "latent_image": ["empty", 0], "denoise": 1.0}
    return node("KSampler", **{**inputs, **settings})


def samples(engine: ModelEngine, api: dict[str, Any], node_id: str) -> torch.Tensor:
    result, _ = engine.run(probed(api, node_id))
    return result.values[node_id][0][0]["samples"]


def test_core_nodes_called_the_classic_way_give_looms_result(bound: ModelEngine) -> None:
    api = {**base(bound), "loom": ksampler(["ckpt", 0]),
           "pack": node("EncodeAndSample", model=["ckpt", 0], clip=["ckpt", 1],
                        latent=["empty", 0], positive="a red fox", negative="blurry", seed=7,
                        steps=2, sampler_name="euler", scheduler="normal")}
    assert torch.equal(samples(bound, api, "pack"), samples(bound, api, "loom"))


def test_comfy_sample_with_prepare_noise_gives_ksamplers_result(bound: ModelEngine) -> None:
    api = {**base(bound), "loom": ksampler(["ckpt", 0]),
           "pack": node("SampleDirect", model=["ckpt", 0], positive=["pos", 0],
                        negative=["neg", 0], latent=["empty", 0], seed=7, steps=2)}
    assert torch.equal(samples(bound, api, "pack"), samples(bound, api, "loom"))


def test_latent_preview_callback_reports_each_step_of_the_pack_node(bound: ModelEngine) -> None:
    api = {**base(bound), "pack": node("SampleDirect", model=["ckpt", 0], positive=["pos", 0],
                                       negative=["neg", 0], latent=["empty", 0], seed=7,
                                       steps=2)}
    _, listener = bound.run(probed(api, "pack"))
    steps = [(d["value"], d["max"]) for name, d in listener.events
             if name == "progress" and d["node"] == "pack"]
    assert steps == [(1, 2), (2, 2)]
    assert any(node_id == "pack" for node_id, _ in listener.previews)


def test_a_model_a_pack_cloned_samples_in_looms_ksampler(bound: ModelEngine) -> None:
    api = {**base(bound), "facts": node("ModelFacts", model=["ckpt", 0]),
           "loom": ksampler(["ckpt", 0]), "after": ksampler(["facts", 0])}
    result, _ = bound.run(probed(api, "loom", "after", "facts"))
    facts = result.values["facts"][1][0]
    assert "clone=True" in facts and "scale=0.18215" in facts and "device=cpu" in facts
    assert torch.equal(result.values["after"][0][0]["samples"],
                       result.values["loom"][0][0]["samples"])


def test_comfy_sd_loads_the_checkpoint_loom_loads_and_encodes_alike(bound: ModelEngine) -> None:
    api = {**base(bound), "image": node("EmptyImage", width=SIZE, height=SIZE, batch_size=1,
                                        color=0x336699),
           "pack": node("LoadAndEncode", ckpt_name=checkpoint(bound), text="a red fox",
                        image=["image", 0]),
           "encoded": node("VAEEncode", pixels=["image", 0], vae=["ckpt", 2]),
           "loom": ksampler(["ckpt", 0]), "packed": ksampler(["pack", 0])}
    result, _ = bound.run(probed(api, "pack", "pos", "encoded", "loom", "packed"))
    (pack_cond, pack_options), = result.values["pack"][1][0]
    (loom_cond, loom_options), = result.values["pos"][0][0]
    assert torch.equal(pack_cond, loom_cond)
    assert torch.equal(pack_options["pooled_output"], loom_options["pooled_output"])
    assert torch.equal(result.values["pack"][3][0]["samples"],
                       result.values["encoded"][0][0]["samples"])
    assert result.values["pack"][4][0] == 8
    assert torch.equal(result.values["packed"][0][0]["samples"],
                       result.values["loom"][0][0]["samples"])


def test_progress_bar_updates_become_progress_events(bound: ModelEngine) -> None:
    _, listener = bound.run(probed({"count": node("CountSteps", steps=3)}, "count"))
    assert [(d["value"], d["max"]) for name, d in listener.events if name == "progress"] == [
        (1, 3), (2, 3), (3, 3)]


def test_folder_paths_lists_the_checkpoint_folder(bound: ModelEngine) -> None:
    name = checkpoint(bound)
    result, _ = bound.run(probed({"files": node("ListFiles", kind="checkpoints")}, "files"))
    assert name in result.values["files"][0][0].split(",")


def test_conditioning_set_values_changes_a_copy(bound: ModelEngine) -> None:
    api = {**base(bound), "half": node("HalfStrength", conditioning=["pos", 0])}
    result, _ = bound.run(probed(api, "half", "pos"))
    assert result.values["half"][0][0][0][1]["strength"] == 0.5
    assert "strength" not in result.values["pos"][0][0][0][1]


def test_common_upscale_resizes_an_image(bound: ModelEngine) -> None:
    api = {"image": node("EmptyImage", width=8, height=4, batch_size=1, color=0),
           "up": node("BasicsUpscale", image=["image", 0])}
    result, _ = bound.run(probed(api, "up"))
    assert tuple(result.values["up"][0][0].shape) == (1, 8, 16, 3)


def test_a_packs_attention_patch_changes_the_sampled_latent(bound: ModelEngine) -> None:
    api = {**base(bound), "patched": node("ScaleAttention", model=["ckpt", 0], scale=3.0),
           "plain": ksampler(["ckpt", 0]), "sample": ksampler(["patched", 0])}
    result, _ = bound.run(probed(api, "sample", "plain"))
    patched = result.values["sample"][0][0]["samples"]
    assert torch.isfinite(patched).all()
    assert not torch.allclose(patched, result.values["plain"][0][0]["samples"], atol=1e-4)


def test_a_packs_identity_post_cfg_function_keeps_the_latent(bound: ModelEngine) -> None:
    api = {**base(bound), "patched": node("GuidancePatches", model=["ckpt", 0],
                                          emb_patch=False),
           "plain": ksampler(["ckpt", 0]), "sample": ksampler(["patched", 0])}
    result, _ = bound.run(probed(api, "sample", "plain"))
    assert torch.allclose(result.values["sample"][0][0]["samples"],
                          result.values["plain"][0][0]["samples"], atol=1e-6)


def test_a_patch_loom_has_no_point_for_fails_naming_it_instead_of_being_dropped(
        bound: ModelEngine) -> None:
    api = {**base(bound), "patched": node("GuidancePatches", model=["ckpt", 0], emb_patch=True),
           "sample": ksampler(["patched", 0])}
    checked = validate_prompt(probed(api, "sample"), bound.registry, bound.services)
    result = bound.executor.execute(checked.prompt, checked.outputs)
    assert result.status == "error"
    assert "patches.emb_patch" in result.error["exception_message"]


def merge_graph(engine: ModelEngine, **merge: Any) -> dict[str, Any]:
    other = "tiny_sd15_other.safetensors"
    if not (engine.base / "models" / "checkpoints" / other).exists():
        engine.checkpoint("sd15", other, seed=1)
    return {**base(engine), "other": node("CheckpointLoaderSimple", ckpt_name=other),
            "merged": node(merge.pop("kind"), model1=["ckpt", 0], model2=["other", 0], **merge),
            "sample": ksampler(["merged", 0])}


def test_a_packs_add_patches_merge_samples_like_looms_model_merge(bound: ModelEngine) -> None:
    pack = samples(bound, merge_graph(bound, kind="PackMerge", ratio=0.3, mode="merge"), "sample")
    loom = samples(bound, merge_graph(bound, kind="ModelMergeSimple", ratio=0.3), "sample")
    plain = samples(bound, {**base(bound), "sample": ksampler(["ckpt", 0])}, "sample")
    assert torch.allclose(pack, loom, atol=1e-5) and not torch.allclose(pack, plain, atol=1e-3)


def test_a_packs_raw_diff_patch_adds_strength_times_the_tensor(bound: ModelEngine) -> None:
    from loom_weight_patches import calculate_weight
    weight, diff = torch.ones(2, 3), torch.arange(6.0).reshape(2, 3)
    entries = [(0.5, (diff,), 1.0, None, None),
               (1.0, ("diff", (diff[1:],)), 2.0, (0, 1, 1), None)]  # row 1 only
    assert torch.equal(calculate_weight(entries, weight.clone(), "k"),
                       torch.stack([1 + 0.5 * diff[0], 2 * (1 + 0.5 * diff[1]) + diff[1]]))
    diffed = samples(bound, merge_graph(bound, kind="PackMerge", ratio=1.0, mode="diff"), "sample")
    plain = samples(bound, {**base(bound), "sample": ksampler(["ckpt", 0])}, "sample")
    assert not torch.allclose(diffed, plain, atol=1e-3)


def test_a_packs_add_patches_clip_merge_encodes_like_looms_clip_merge(bound: ModelEngine) -> None:
    def encoded(kind: str, ratio: float = 0.3) -> torch.Tensor:
        api = {**merge_graph(bound, kind="PackMerge", ratio=1.0, mode="merge"),
               "clip": node(kind, clip1=["ckpt", 1], clip2=["other", 1], ratio=ratio),
               "text": node("CLIPTextEncode", text="a red fox", clip=["clip", 0])}
        result, _ = bound.run(probed(api, "text"))
        return result.values["text"][0][0][0][0]

    pack, loom = encoded("PackClipMerge"), encoded("CLIPMergeSimple")
    unmerged = encoded("CLIPMergeSimple", ratio=1.0)  # all of clip1
    assert torch.allclose(pack, loom, atol=1e-5) and not torch.allclose(pack, unmerged, atol=1e-3)


def test_an_add_patches_value_loom_cannot_apply_fails_naming_the_key(bound: ModelEngine) -> None:
    api = merge_graph(bound, kind="PackMerge", ratio=1.0, mode="lora_adapter")
    checked = validate_prompt(probed(api, "sample"), bound.registry, bound.services)
    result = bound.executor.execute(checked.prompt, checked.outputs)
    assert result.status == "error"
    assert "add_patches value for 'diffusion_model." in result.error["exception_message"]


@pytest.mark.parametrize("name", ["comfy.sd", "comfy.samplers", "comfy.sample",
                                  "comfy.model_patcher", "comfy.k_diffusion.sampling",
                                  "comfy.latent_formats", "comfy.model_base", "comfy.controlnet",
                                  "comfy.lora", "comfy.ops", "comfy.sampler_helpers",
                                  "comfy.clip_vision", "comfy.sdxl_clip", "comfy.cli_args",
                                  "execution", "comfy_execution.graph",
                                  "comfy_execution.graph_utils", "server", "node_helpers",
                                  "latent_preview"])
def test_the_modules_packs_import_exist(bound: ModelEngine, name: str) -> None:
    __import__(name)


def blocking(block: bool, message: str = "") -> dict[str, Any]:
    return {"gate": node("MaybeBlock", value=3, block=block, message=message),
            "count": node("CountSteps", steps=["gate", 0])}


def test_an_execution_blocker_stops_the_pack_node_that_consumes_it(bound: ModelEngine) -> None:
    result, listener = bound.run(probed(blocking(True), "count"))
    assert not [d for name, d in listener.events if name == "progress"]
    assert type(result.values["count"][0][0]).__name__ == "ExecutionBlocker"


def test_a_blocker_with_a_message_fails_the_consumer_with_it(bound: ModelEngine) -> None:
    checked = validate_prompt(probed(blocking(True, "switched off"), "count"), bound.registry,
                              bound.services)
    result = bound.executor.execute(checked.prompt, checked.outputs)
    assert result.status == "error" and "switched off" in result.error["exception_message"]


def test_an_open_gate_passes_the_value(bound: ModelEngine) -> None:
    result, _ = bound.run(probed(blocking(False), "count"))
    assert result.values["count"][0][0] == 3
