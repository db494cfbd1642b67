"""GLIGEN: the position net and gated self-attention against their published equations, a
GLIGEN file (written by the project's writer in the original key layout) through GLIGENLoader
and GLIGENTextBoxApply, and the grounding's effect on sampling through the UNet's
`middle_patch` point."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from engine.diffusion.checkpoints.gligen_loader import load_gligen, split_gligen_state
from engine.diffusion.checkpoints.state_files import CheckpointError, StateFile
from engine.diffusion.checkpoints.text_encoders import load_text_encoder_state
from engine.diffusion.checkpoints.writer import (
    random_checkpoint,
    random_gligen,
    write_random_gligen,
)
from engine.diffusion.memory.devices import DevicePolicy
from engine.diffusion.networks.gligen import (
    GatedSelfAttention,
    Gligen,
    fourier_embedding,
    fuser_heads,
)
from engine.diffusion.sampling.conditioning import CondEntry, Grounding, ModelInputs, pair_entries
from engine.diffusion.text.tokenizer import ClipBpe
from nodes.gligen import GLIGENTextBoxApply
from tests.model_engine import ModelEngine, node, probed

POLICY = DevicePolicy.decide(cpu=True, force_fp32=True)


def opened(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
           name: str = "g.safetensors") -> StateFile:
    return StateFile(Path(name), tensors, metadata or {})


def tiny_gligen(seed: int = 0) -> Gligen:
    tensors, metadata = random_gligen("sd15", seed=seed)
    return load_gligen(opened(tensors, metadata), POLICY).module


def test_box_fourier_features_are_sin_and_cos_of_eight_frequencies() -> None:
    box = torch.tensor([0.1, 0.2, 0.6, 0.9])
    expected = []
    for k in range(8):
        frequency = 100 ** (k / 8)
        expected += [math.sin(frequency * c) for c in box.tolist()]
        expected += [math.cos(frequency * c) for c in box.tolist()]
    assert torch.allclose(fourier_embedding(box), torch.tensor(expected), atol=1e-5)


def test_position_net_puts_null_features_in_unused_slots() -> None:
    net = tiny_gligen().position_net
    boxes = torch.rand(1, 3, 4)
    phrases = torch.randn(1, 3, net.in_dim)
    masks = torch.tensor([[1.0, 0.0, 0.0]])
    tokens = net(boxes, masks, phrases)

    def mlp(phrase: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        h = torch.cat([phrase, position])
        for slot in ("0", "2"):
            h = torch.nn.functional.silu(net.linears[slot](h))
        return net.linears["4"](h)

    assert torch.allclose(tokens[0, 0], mlp(phrases[0, 0], fourier_embedding(boxes[0, 0])),
                          atol=1e-5)
    null = mlp(net.null_positive_feature, net.null_position_feature)
    assert torch.allclose(tokens[0, 1], null, atol=1e-5)
    assert torch.allclose(tokens[0, 2], null, atol=1e-5)


def reference_gated_attention(fuser: GatedSelfAttention, x: torch.Tensor,
                              objects: torch.Tensor) -> torch.Tensor:
    """x + tanh(a) * SelfAttn(LN([x, W objs]))[:T] then + tanh(b) * GEGLU-FF(LN(x)), with the
    attention written out (softmax(q k^T / sqrt(d)) v per head)."""
    tokens = torch.cat([x, fuser.linear(objects)], dim=1)
    n = fuser.norm1(tokens)
    attn = fuser.attn
    heads, width = attn.heads, attn.dim_head

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], heads, width).transpose(1, 2)

    q, k, v = split(attn.to_q(n)), split(attn.to_k(n)), split(attn.to_v(n))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width), dim=-1)
    out = attn.to_out[0]((weights @ v).transpose(1, 2).reshape(n.shape))[:, :x.shape[1]]
    x = x + torch.tanh(fuser.alpha_attn) * out
    value, gate = fuser.ff.net["0"].proj(fuser.norm2(x)).chunk(2, dim=-1)
    dense = fuser.ff.net["2"](value * torch.nn.functional.gelu(gate))
    return x + torch.tanh(fuser.alpha_dense) * dense


def test_a_fuser_is_gated_self_attention_over_image_and_grounding_tokens() -> None:
    fuser = tiny_gligen().fusers[0]
    x = torch.randn(2, 16, fuser.query_dim)
    objects = torch.randn(2, 30, fuser.linear.in_features)
    with torch.no_grad():
        assert torch.allclose(fuser(x, objects), reference_gated_attention(fuser, x, objects),
                              atol=1e-5)


def test_fuser_heads_follow_gligens_rule() -> None:
    assert fuser_heads(640, 768) == (8, 80)  # SD1: 8 heads at every width
    assert fuser_heads(640, 1024) == (10, 64)  # any other context: 64-wide heads


def test_the_loader_orders_fusers_as_the_unets_transformers() -> None:
    tensors, _ = random_gligen("sd15", tiny=False)
    fusers, position = split_gligen_state(tensors, "g")
    widths = [fuser["linear.weight"].shape[0] for fuser in fusers]
    # SD1.5: input blocks 1, 2 / 4, 5 / 7, 8, the middle block, output blocks 3 .. 11
    assert widths == [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640,
                      320, 320, 320]
    assert set(position) == {"linears.0.weight", "linears.0.bias", "linears.2.weight",
                             "linears.2.bias", "linears.4.weight", "linears.4.bias",
                             "null_positive_feature", "null_position_feature"}
    assert tuple(position["linears.0.weight"].shape) == (512, 768 + 64)


def test_the_loader_reads_prefixed_files_the_same() -> None:
    tensors, metadata = random_gligen("sd15")
    plain = load_gligen(opened(tensors, metadata), POLICY).module
    prefixed = {("model.diffusion_model." + key if ".fuser." in key else key): value
                for key, value in tensors.items()}
    again = load_gligen(opened(prefixed, metadata), POLICY).module
    assert all(torch.equal(value, again.state_dict()[key])
               for key, value in plain.state_dict().items())


def test_a_file_without_fusers_is_refused_with_the_fix() -> None:
    with pytest.raises(CheckpointError, match="not a GLIGEN model.*models/gligen"):
        load_gligen(opened({"position_net.null_positive_feature": torch.zeros(4)}), POLICY)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> ModelEngine:
    engine = ModelEngine(tmp_path_factory.mktemp("gligen"))
    engine.checkpoint("sd15", "sd.safetensors")
    gligen = engine.base / "models" / "gligen"
    write_random_gligen(gligen / "boxes.safetensors")
    tensors, metadata = random_gligen("sd15")
    closed = {key: torch.zeros(()) if key.endswith(("alpha_attn", "alpha_dense")) else value
              for key, value in tensors.items()}
    save_file(closed, str(gligen / "closed_gates.safetensors"), metadata=metadata)
    return engine


def workflow(gligen: str, boxes: list[tuple[str, int, int, int, int]]) -> dict[str, Any]:
    api: dict[str, Any] = {
        "ckpt": node("CheckpointLoaderSimple", ckpt_name="sd.safetensors"),
        "gligen": node("GLIGENLoader", gligen_name=gligen),
        "text": node("CLIPTextEncode", text="a picnic", clip=["ckpt", 1]),
        "neg": node("CLIPTextEncode", text="", clip=["ckpt", 1]),
        "empty": node("EmptyLatentImage", width=32, height=32, batch_size=1)}
    source = "text"
    for index, (text, width, height, x, y) in enumerate(boxes):
        api[f"box{index}"] = node("GLIGENTextBoxApply", conditioning_to=[source, 0],
                                  clip=["ckpt", 1], gligen_textbox_model=["gligen", 0],
                                  text=text, width=width, height=height, x=x, y=y)
        source = f"box{index}"
    api["sample"] = node("KSampler", model=["ckpt", 0], seed=3, steps=2, cfg=5.0,
                         sampler_name="euler", scheduler="normal", positive=[source, 0],
                         negative=["neg", 0], latent_image=["empty", 0], denoise=1.0)
    return probed(api, "sample", source, "text", "ckpt")


def run(engine: ModelEngine, gligen: str, boxes: list[tuple[str, int, int, int, int]]
        ) -> Any:
    result, _ = engine.run(workflow(gligen, boxes))
    return result


def sample_of(result: Any) -> torch.Tensor:
    return result.values["sample"][0][0]["samples"]


def test_boxes_are_stored_in_latent_cells_with_the_unprojected_pooled_text(
        engine: ModelEngine) -> None:
    result = run(engine, "boxes.safetensors", [("a dog", 20, 16, 9, 31), ("a hat", 8, 8, 0, 0)])
    cond, options = result.values["box1"][0][0][0]
    kind, model, boxes = options["gligen"]
    assert kind == "position" and model.name == "boxes.safetensors"
    assert [box[1:] for box in boxes] == [(2, 2, 3, 1), (1, 1, 0, 0)]
    assert torch.equal(cond, result.values["text"][0][0][0][0])
    assert boxes[0][0].shape == (1, 64)  # the tiny CLIP-L width (SD1 has no projection)
    clip = result.values["ckpt"][1][0]
    assert torch.equal(boxes[0][0], clip.encode("a dog").pooled)


def test_closed_gates_leave_the_sample_unchanged(engine: ModelEngine) -> None:
    plain = sample_of(run(engine, "boxes.safetensors", []))
    closed = sample_of(run(engine, "closed_gates.safetensors", [("a dog", 16, 16, 8, 0)]))
    assert torch.allclose(plain, closed, atol=1e-6)


def test_grounding_steers_the_sample_by_box_and_phrase(engine: ModelEngine) -> None:
    plain = sample_of(run(engine, "boxes.safetensors", []))
    left = sample_of(run(engine, "boxes.safetensors", [("a dog", 16, 16, 0, 0)]))
    right = sample_of(run(engine, "boxes.safetensors", [("a dog", 16, 16, 16, 16)]))
    cat = sample_of(run(engine, "boxes.safetensors", [("a cat", 16, 16, 0, 0)]))
    assert not torch.allclose(plain, left)
    assert not torch.allclose(left, right) and not torch.allclose(left, cat)
    again = sample_of(run(engine, "boxes.safetensors", [("a dog", 16, 16, 0, 0)]))
    assert torch.equal(left, again)


def test_more_than_thirty_boxes_are_refused(engine: ModelEngine) -> None:
    result = run(engine, "boxes.safetensors", [("a dog", 8, 8, 0, 0)])
    conditioning = result.values["box0"][0][0]
    kind, model, boxes = conditioning[0][1]["gligen"]
    full = [[conditioning[0][0], {"gligen": (kind, model, boxes * 30)}]]
    clip = result.values["ckpt"][1][0]
    with pytest.raises(ValueError, match="at most 30"):
        GLIGENTextBoxApply().execute(None, full, clip, model, "x", 8, 8, 0, 0)  # type: ignore[arg-type]


class _Model:
    def middle_patch(self, positions: Any, latent_shape: Any, device: Any) -> Any:
        return lambda x, options: x


def _entry(grounding: Grounding | None = None, area: Any = None) -> CondEntry:
    return CondEntry(ModelInputs(torch.zeros(1, 1, 4)), area=area, grounding=grounding)


def test_the_negative_borrows_the_positive_grounding_unless_it_has_its_own() -> None:
    grounding = Grounding(_Model(), ())
    positive, negative = pair_entries([_entry(grounding)], [_entry()])
    assert negative[0].grounding is grounding
    own = Grounding(_Model(), ())
    _, negative = pair_entries([_entry(grounding)], [_entry(own)])
    assert negative[0].grounding is own


def test_a_gligen_for_another_unet_fails_with_a_clear_error() -> None:
    gligen = tiny_gligen()
    patch = gligen.middle_patch([], (1, 4, 4, 4), torch.device("cpu"))
    with pytest.raises(ValueError, match="SD model family it was made for"):
        patch(torch.zeros(1, 16, 48), {"transformer_index": 0})


def test_unprojected_pooled_text_is_the_pooled_vector_before_the_projection() -> None:
    tensors, _ = random_checkpoint("sd21v")
    clip = load_text_encoder_state("sd2", tensors, ClipBpe.load())
    tokens = clip.tokenize("a red box")
    raw = clip.encode_tokens(tokens, projected_pooled=False).pooled
    projected = clip.encode_tokens(tokens).pooled
    assert torch.allclose(raw @ clip.encoders["h"].text_projection, projected, atol=1e-5)
