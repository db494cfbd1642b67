"""Prompt syntax: ComfyUI's weight rules, escapes, and textual-inversion references/files."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import safetensors.torch
import torch

from engine.diffusion.text.prompt_weights import (
    EmbeddingFolders,
    parse_weighted_prompt,
    split_top_level_groups,
)
from engine.diffusion.text.tokenizer import (
    END_TOKEN,
    START_TOKEN,
    ClipBpe,
    ClipTokenizer,
    WindowSpec,
)

WIDTH = 8


@pytest.mark.parametrize(("prompt", "expected"), [
    ("foo", [("foo", 1.0)]),
    ("(foo)", [("foo", 1.1)]),
    ("(foo)(bar)", [("foo", 1.1), ("bar", 1.1)]),
    ("(foo:2.0)", [("foo", 2.0)]),
    ("((foo))", [("foo", 1.21)]),
    ("((foo):1.1)", [("foo", 1.21)]),
    ("((foo:1.1))", [("foo", 1.1)]),
    ("((a):1.5)", [("a", 1.65)]),
    ("(foo:0.0)", [("foo", 0.0)]),
    ("((foo:1.0):0.0)", [("foo", 1.0)]),
    ("foo ((((lol (cat:666) attack:100)))) baz",
     [("foo ", 1.0), ("lol ", 100.0), ("cat", 666.0), (" attack", 100.0), (" baz", 1.0)]),
    ("foo ((((lol (cat:666) attack):100))) baz",
     [("foo ", 1.0), ("lol ", 110.0), ("cat", 666.0), (" attack", 110.0), (" baz", 1.0)]),
    ("(a:1e1)", [("a", 10.0)]),
    ("(a: 2 )", [("a", 2.0)]),
    ("(a:b)", [("a:b", 1.1)]),
    ("(:1.5)", [(":1.5", 1.1)]),
    ("a () b", [("a ", 1.0), (" b", 1.0)]),
])
def test_weight_rules_match_comfyui(prompt: str, expected: list[tuple[str, float]]) -> None:
    result = parse_weighted_prompt(prompt)
    assert [text for text, _ in result] == [text for text, _ in expected]
    assert [weight for _, weight in result] == pytest.approx([w for _, w in expected])


def test_nested_weights_multiply_exactly_like_comfyui() -> None:
    # ComfyUI multiplies 1.0 * 1.1 * 1.1 in floating point; so do we
    assert parse_weighted_prompt("((a))")[0][1] == 1.0 * 1.1 * 1.1


def test_escaped_parentheses_are_literal() -> None:
    assert parse_weighted_prompt("\\(foo\\)(bar)") == [("(foo)", 1.0), ("bar", pytest.approx(1.1))]
    assert parse_weighted_prompt("(a \\(b\\):1.2)") == [("a (b)", 1.2)]


@pytest.mark.parametrize(("prompt", "expected"), [
    ("(a b", [("(a b", 1.0)]),
    ("((a)", [("(a", 1.1)]),
    ("a) b (c)", [("a) b (c)", 1.0)]),
    ("a (b", [("a ", 1.0), ("(b", 1.0)]),
])
def test_unbalanced_parentheses_stay_text(prompt: str, expected: list) -> None:
    result = parse_weighted_prompt(prompt)
    assert [text for text, _ in result] == [text for text, _ in expected]
    assert [weight for _, weight in result] == pytest.approx([w for _, w in expected])


def test_top_level_groups_split() -> None:
    assert split_top_level_groups("(foo(bar)(test1))(test2(test3))") == [
        "(foo(bar)(test1))", "(test2(test3))"]


# --- textual inversion ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe() -> ClipBpe:
    return ClipBpe.load()


def _vectors(rows: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def embeddings_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    safetensors.torch.save_file({"emb_params": _vectors(2, seed=1)}, folder / "kohya.safetensors")
    safetensors.torch.save_file({"string_to_param.*": _vectors(3, seed=2)},
                                folder / "flat.safetensors")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": _vectors(2, seed=3)},
                "name": "a1111", "step": 500, "sd_checkpoint": "abc123",
                "sd_checkpoint_name": "v1-5"}, folder / "a1111.pt")
    torch.save(_vectors(1, seed=4)[0], folder / "single.bin")
    safetensors.torch.save_file({"clip_l": _vectors(2, seed=5),
                                 "clip_g": _vectors(2, width=16, seed=6)},
                                folder / "sdxl.safetensors")
    safetensors.torch.save_file({"emb_params": _vectors(1, seed=7)},
                                folder / "sub" / "deep.safetensors")
    (folder / "broken.pt").write_bytes(b"not a torch file")
    safetensors.torch.save_file({"emb_params": _vectors(2, width=12)}, folder / "wide.safetensors")
    return folder


def _tokenizer(bpe: ClipBpe, folder: Path, width: int = WIDTH, key: str = "clip_l"):
    spec = WindowSpec(pad_token=END_TOKEN, width=width, embedding_key=key)
    return ClipTokenizer(bpe, spec, EmbeddingFolders((folder,)))


@pytest.mark.parametrize(("name", "expected"), [
    ("kohya", _vectors(2, seed=1)),
    ("flat", _vectors(3, seed=2)),
    ("a1111", _vectors(2, seed=3)),
    ("single", _vectors(1, seed=4)),
    ("sdxl", _vectors(2, seed=5)),
    ("deep", _vectors(1, seed=7)),
])
def test_embedding_replaces_exactly_its_name(bpe: ClipBpe, embeddings_dir: Path, name: str,
                                             expected: torch.Tensor) -> None:
    tokenizer = _tokenizer(bpe, embeddings_dir)
    window = tokenizer.tokenize(f"a embedding:{name} b").windows[0]
    rows = expected.shape[0]
    assert window[:2] == ((START_TOKEN, 1.0), (320, 1.0))
    for offset in range(rows):
        vector, weight = window[2 + offset]
        assert torch.equal(vector, expected[offset]) and weight == 1.0
    assert window[2 + rows:4 + rows] == ((321, 1.0), (END_TOKEN, 1.0))
    plain = tokenizer.tokenize("a b").windows[0]
    assert window[2 + rows:] == plain[2:len(window) - rows]


def test_sdxl_embedding_gives_each_encoder_its_own_tensor(bpe: ClipBpe,
                                                          embeddings_dir: Path) -> None:
    clip_g = _tokenizer(bpe, embeddings_dir, width=16, key="clip_g")
    vector, _ = clip_g.tokenize("embedding:sdxl").windows[0][1]
    assert torch.equal(vector, _vectors(2, width=16, seed=6)[0])


def test_embedding_takes_the_group_weight(bpe: ClipBpe, embeddings_dir: Path) -> None:
    window = _tokenizer(bpe, embeddings_dir).tokenize("(embedding:kohya:1.2) cat").windows[0]
    assert [weight for _, weight in window[1:3]] == [1.2, 1.2]
    assert window[3] == (2368, 1.0)


def test_unknown_embedding_warns_and_is_left_out(bpe: ClipBpe, embeddings_dir: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = _tokenizer(bpe, embeddings_dir)
    with caplog.at_level(logging.WARNING, logger="loom.clip"):
        result = tokenizer.tokenize("a embedding:nosuchthing b")
    assert len(result.warnings) == 1 and "embedding:nosuchthing" in result.warnings[0]
    assert "nosuchthing" in caplog.text
    assert result.windows == tokenizer.tokenize("a b").windows


def test_unreadable_and_mismatched_embeddings_warn(bpe: ClipBpe, embeddings_dir: Path) -> None:
    result = _tokenizer(bpe, embeddings_dir).tokenize("embedding:broken embedding:wide")
    assert len(result.warnings) == 2
    assert "could not be read" in result.warnings[0]
    assert "width 12" in result.warnings[1]


def test_text_after_an_embedding_name_is_kept(bpe: ClipBpe, embeddings_dir: Path) -> None:
    tokenizer = _tokenizer(bpe, embeddings_dir)
    window = tokenizer.tokenize("embedding:kohya, cat").windows[0]
    assert [token for token, _ in window[3:6]] == [267, 2368, END_TOKEN]  # ", cat"
    lora = tokenizer.tokenize("embedding:single<lora:x:1>").windows[0]
    assert isinstance(lora[1][0], torch.Tensor)
    assert [token for token, _ in lora[2:4]] == bpe.encode("<lora:x:1>")[:2]


def test_embedding_reference_needs_whitespace_before_it(bpe: ClipBpe, embeddings_dir: Path) -> None:
    window = _tokenizer(bpe, embeddings_dir).tokenize("a,embedding:kohya").windows[0]
    assert all(isinstance(token, int) for token, _ in window)


def test_without_lookup_embedding_text_is_plain_text(bpe: ClipBpe) -> None:
    spec = WindowSpec(pad_token=END_TOKEN, width=WIDTH, embedding_key="clip_l")
    window = ClipTokenizer(bpe, spec).tokenize("embedding:foo").windows[0]
    assert [token for token, _ in window[1:-1] if token != END_TOKEN] == bpe.encode("embedding:foo")


def test_embedding_folders_lookup(embeddings_dir: Path) -> None:
    find = EmbeddingFolders((embeddings_dir,))
    assert find("kohya") == (embeddings_dir / "kohya.safetensors").resolve()
    assert find("a1111.pt") == (embeddings_dir / "a1111.pt").resolve()
    assert find("deep") == (embeddings_dir / "sub" / "deep.safetensors").resolve()
    assert find("sub/deep") == (embeddings_dir / "sub" / "deep.safetensors").resolve()
    assert find("missing") is None
    assert find("../../etc/passwd") is None
