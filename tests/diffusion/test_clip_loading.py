"""Loading text encoders from checkpoints (every prefix form) and from separate files; module
names checked against the real checkpoint layouts in tests/data/formats."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine.diffusion.checkpoints.text_encoders import (
    build_text_encoder,
    detect_text_encoder_architecture,
    detect_text_encoder_family,
    family_for_architectures,
    hf_to_openclip_state,
    infer_text_encoder_config,
    load_text_encoder_files,
    load_text_encoder_state,
)
from engine.diffusion.memory.cast_on_use import Holding
from engine.diffusion.networks.clip_text import CLIP_L_CONFIG, TINY_CLIP_L_CONFIG, ClipTextModel
from engine.diffusion.networks.openclip_text import (
    TINY_OPENCLIP_CONFIG,
    VIT_BIGG_CONFIG,
    VIT_H_CONFIG,
    OpenClipTextModel,
)
from engine.diffusion.text.tokenizer import ClipBpe
from tests.diffusion.manifests import manifest
from tests.diffusion.test_clip_text import openclip_to_hf, randomize

TINY_G = replace(TINY_OPENCLIP_CONFIG, width=48, heads=3)


@pytest.fixture(scope="module")
def bpe() -> ClipBpe:
    return ClipBpe.load()


def _state(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + key: value.clone() for key, value in model.state_dict().items()}


def _tiny_l() -> ClipTextModel:
    model = ClipTextModel(TINY_CLIP_L_CONFIG)
    randomize(model, seed=4)
    return model


def _tiny_g() -> OpenClipTextModel:
    model = OpenClipTextModel(TINY_G)
    randomize(model, seed=5)
    return model


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.parametrize("prefix", ["cond_stage_model.transformer.text_model.",
                                    "cond_stage_model.transformer."])
def test_sd1_checkpoint_prefixes(bpe, prefix: str) -> None:
    source = _tiny_l()
    checkpoint = _state(source, prefix)
    checkpoint[prefix + "embeddings.position_ids"] = torch.arange(77)[None]
    checkpoint["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    stack = load_text_encoder_state("sd1", checkpoint, bpe, configs={"l": TINY_CLIP_L_CONFIG})
    assert stack.family == "sd1" and _same_weights(stack.encoders["l"], source)
    assert detect_text_encoder_family(checkpoint) == "sd1"


def test_sd2_checkpoint_keeps_logit_scale(bpe) -> None:
    source = _tiny_g()
    with torch.no_grad():
        source.logit_scale.fill_(4.6052)
    checkpoint = _state(source, "cond_stage_model.model.")
    stack = load_text_encoder_state("sd2", checkpoint, bpe, configs={"h": TINY_G})
    assert _same_weights(stack.encoders["h"], source)
    assert detect_text_encoder_family(checkpoint) == "sd2"


def test_sdxl_and_refiner_checkpoints(bpe) -> None:
    clip_l, clip_g = _tiny_l(), _tiny_g()
    base = {**_state(clip_l, "conditioner.embedders.0.transformer.text_model."),
            **_state(clip_g, "conditioner.embedders.1.model.")}
    configs = {"l": TINY_CLIP_L_CONFIG, "g": TINY_G}
    stack = load_text_encoder_state("sdxl", base, bpe, configs=configs)
    assert _same_weights(stack.encoders["l"], clip_l) and _same_weights(stack.encoders["g"], clip_g)
    refiner = _state(clip_g, "conditioner.embedders.0.model.")
    assert _same_weights(load_text_encoder_state("sdxl_refiner", refiner, bpe,
                                                 configs=configs).encoders["g"], clip_g)
    assert detect_text_encoder_family(base) == "sdxl"
    assert detect_text_encoder_family(refiner) == "sdxl_refiner"


def test_missing_weight_is_named(bpe) -> None:
    checkpoint = _state(_tiny_l(), "cond_stage_model.transformer.text_model.")
    del checkpoint["cond_stage_model.transformer.text_model.final_layer_norm.bias"]
    with pytest.raises(ValueError, match="final_layer_norm.bias"):
        load_text_encoder_state("sd1", checkpoint, bpe, configs={"l": TINY_CLIP_L_CONFIG})


def test_wrong_family_is_explained(bpe) -> None:
    checkpoint = _state(_tiny_l(), "cond_stage_model.transformer.text_model.")
    with pytest.raises(ValueError, match="detected: sd1"):
        load_text_encoder_state("sdxl", checkpoint, bpe)


def test_loading_casts_to_the_requested_dtype(bpe) -> None:
    checkpoint = _state(_tiny_l(), "cond_stage_model.transformer.text_model.")
    stack = load_text_encoder_state("sd1", checkpoint, bpe, holding=Holding(torch.bfloat16),
                                    configs={"l": TINY_CLIP_L_CONFIG})
    assert {p.dtype for p in stack.encoders["l"].parameters()} == {torch.bfloat16}
    assert stack.encode("a cat").cond.dtype == torch.float32


def test_config_is_read_from_the_weights() -> None:
    source = OpenClipTextModel(replace(TINY_G, width=128, heads=2))
    config = infer_text_encoder_config("vit_bigg", source.state_dict())
    assert config == replace(TINY_G, width=128, heads=2)
    with pytest.raises(ValueError, match="width 48 is not a multiple"):
        infer_text_encoder_config("vit_bigg", _tiny_g().state_dict())


def test_hf_format_bigg_file_converts_to_openclip_names() -> None:
    source = _tiny_g()
    hf_file = openclip_to_hf(source.state_dict(), TINY_G.width)
    hf_file["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    converted = hf_to_openclip_state({k.removeprefix("text_model."): v for k, v in hf_file.items()})
    model = build_text_encoder("vit_bigg", converted, config=TINY_G)
    state, original = model.state_dict(), source.state_dict()
    assert all(torch.equal(state[k], original[k]) for k in state if k != "logit_scale")


def test_separate_files_make_an_sdxl_handle(bpe) -> None:
    clip_l, clip_g = _tiny_l(), _tiny_g()
    files = [openclip_to_hf(clip_g.state_dict(), TINY_G.width), _state(clip_l, "text_model.")]
    stack = load_text_encoder_files(files, bpe, architectures=["vit_bigg", "clip_l"],
                                    configs={"l": TINY_CLIP_L_CONFIG, "g": TINY_G})
    assert stack.family == "sdxl"
    assert _same_weights(stack.encoders["l"], clip_l)
    assert torch.equal(stack.encoders["g"].text_projection, clip_g.text_projection)


def test_file_architecture_from_width() -> None:
    def fake(key: str, width: int) -> dict[str, torch.Tensor]:
        return {key: torch.empty(49408, width, device="meta")}

    assert detect_text_encoder_architecture(
        fake("text_model.embeddings.token_embedding.weight", 768)) == "clip_l"
    assert detect_text_encoder_architecture(fake("token_embedding.weight", 1024)) == "vit_h"
    assert detect_text_encoder_architecture(
        fake("text_model.embeddings.token_embedding.weight", 1280)) == "vit_bigg"
    with pytest.raises(ValueError, match="width 512"):
        detect_text_encoder_architecture(fake("token_embedding.weight", 512))


def test_family_from_file_kinds() -> None:
    assert family_for_architectures(["clip_l"]) == "sd1"
    assert family_for_architectures(["vit_bigg", "clip_l"]) == "sdxl"
    with pytest.raises(ValueError, match="supported sets"):
        family_for_architectures(["clip_l", "vit_h"])


# --- layouts of the real checkpoints (tests/data/formats/*.tsv) ---------------------------------


def _layout(name: str, prefix: str) -> dict[str, tuple[int, ...]]:
    return {key[len(prefix):]: shape for key, (_dtype, shape) in manifest(name).items()
            if key.startswith(prefix) and not key.endswith("position_ids")}


@pytest.mark.parametrize(("file", "prefix", "model_class", "config"), [
    ("sd15", "cond_stage_model.transformer.text_model.", ClipTextModel, CLIP_L_CONFIG),
    ("sd21v", "cond_stage_model.model.", OpenClipTextModel, VIT_H_CONFIG),
    ("sdxl_base", "conditioner.embedders.0.transformer.text_model.", ClipTextModel,
     CLIP_L_CONFIG),
    ("sdxl_base", "conditioner.embedders.1.model.", OpenClipTextModel, VIT_BIGG_CONFIG),
    ("sdxl_refiner", "conditioner.embedders.0.model.", OpenClipTextModel, VIT_BIGG_CONFIG),
])
def test_module_names_mirror_checkpoint_keys(file, prefix, model_class, config) -> None:
    layout = _layout(file, prefix)
    with torch.device("meta"):
        model = model_class(config)
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert ours == layout
    architecture = "clip_l" if model_class is ClipTextModel else (
        "vit_h" if config is VIT_H_CONFIG else "vit_bigg")
    weights = {key: torch.empty(shape, device="meta") for key, shape in layout.items()}
    assert infer_text_encoder_config(architecture, weights) == config
