"""CLIP BPE tokenizer: the shipped vocabulary, parity with transformers' CLIPTokenizer, and
ComfyUI's 77-token windows."""

from __future__ import annotations

import gzip
import html
import json
import random
from pathlib import Path

import pytest

from engine.diffusion.text.tokenizer import (
    CONTEXT_LENGTH,
    END_TOKEN,
    START_TOKEN,
    VOCAB_PATH,
    BpeCache,
    BpeVocabulary,
    ClipBpe,
    ClipTokenizer,
    WindowSpec,
    split_into_windows,
)

CLIP_L_WINDOWS = WindowSpec(pad_token=END_TOKEN, width=768, embedding_key="clip_l")
OPENCLIP_WINDOWS = WindowSpec(pad_token=0, width=1280, embedding_key="clip_g")

HAND_WRITTEN = [
    "", " ", "a", "A photo of a cat", "a photo of a cat", "masterpiece, best quality, 1girl",
    "(masterpiece:1.2), (best quality), ((ultra detailed)), [blurry]",
    "\\(escaped\\) parens \\(again\\)", "(unbalanced paren", "unbalanced) paren",
    "embedding:EasyNegative, worst quality", "(embedding:foo:1.2) bar", "embedding:bad-hands-5",
    "it's a dog's life", "don't won't can't shan't", "they're we've I'm you'll he'd",
    "IT'S LOUD", "rock 'n' roll", "''quoted''", "'s 't 're 've 'm 'll 'd",
    "café crème brûlée", "naïve coöperation", "Ångström Øresund Ærø", "São Paulo, Łódź, Škoda",
    "Straße groß", "İstanbul ıi", "ǅungla ǈ ǋ", "e\u0301 combining acute", "n\u0303o",
    "東京タワーの夜景", "北京烤鸭", "한국어 텍스트", "日本語とEnglishの混在", "中文，标点。",
    "Ελληνικά γράμματα", "Русский текст", "עברית", "العربية", "हिन्दी", "ไทย",
    "emoji 😀😃😄", "👨‍👩‍👧‍👦 family", "🏳️‍🌈 flag", "❤️ love", "🐱🐶 pets", "🇯🇵🇺🇸",
    "1234567890", "3.14159", "1,000,000", "42nd street", "v1.5", "1024x1024", "0.5mm",
    "¼ ½ ¾", "①②③", "٣٤٥", "Ⅻ", "²³", "1e-5",
    "!!!", "???!!!...", "...", "—–-", "***", "#hashtag @mention", "a/b\\c|d", "<lora:foo:0.8>",
    "[a|b]", "{a|b}", "a:b:c", "~tilde~", "$100 €50 £30 ¥20", "100%", "C++ & C#",
    "&amp; &lt;tag&gt; &quot;q&quot; &#39;s &#x27;", "&amp;amp;", "AT&T", "&nbsp;x",
    "tab\tseparated", "new\nline", "crlf\r\nline", "many     spaces", "  leading and trailing  ",
    "\u00a0nbsp\u00a0", "\u3000ideographic space", "\u200bzero width", "\ufeffbom",
    "soft\u00adhyphen",
    "control\x00char", "bell\x07", "\x1cfile sep", "\x85next line", "\u2028line sep",
    "<|startoftext|>", "<|endoftext|>", "a <|endoftext|> b", "<|ENDOFTEXT|>", "<|endoftext",
    "ﬁ ligature ﬂ", "ｆｕｌｌｗｉｄｔｈ", "ＡＢＣ１２３", "ℌ𝔢𝔩𝔩𝔬", "𝓼𝓬𝓻𝓲𝓹𝓽", "Ⓐⓑⓒ",
    "mojibake cafÃ©", "curly “quotes” and ‘single’", "don’t", "…ellipsis", "•bullet",
    "x" * 300, "abc" * 100, "supercalifragilisticexpialidocious", "pneumonoultramicroscopic",
    "word " * 80, "(long:1.3) " * 40, "a, " * 120,
    "photo of a (red:1.5) car, (blue sky), ((dramatic lighting)), [[low quality]]",
    "score_9, score_8_up, score_7_up, source_anime", "BREAK", "AND", "a AND b BREAK c",
    "\U0001f600" * 30, "\U00020000\U0002a6d6 ext-B", "\ud7ff", "\ue000 private use",
]


def _generated_prompts(count: int) -> list[str]:
    """Random prompts mixing the character classes the tokenizer treats differently."""
    rng = random.Random(1234)
    pools = [
        "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789",
        " \t\n  ", ".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`", "éèêëàâäôöûüçñßøåæœ",
        "日本語中文한국어テキスト", "😀🐱🌈✨🔥👍", "αβγδεжзий", "\u0301\u0308\u200d\ufe0f",
    ]
    prompts = []
    for _ in range(count):
        length = rng.randint(1, 60)
        prompts.append("".join(rng.choice(rng.choice(pools)) for _ in range(length)))
    return prompts


CORPUS = HAND_WRITTEN + _generated_prompts(120)


@pytest.fixture(scope="module")
def bpe() -> ClipBpe:
    return ClipBpe.load()


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """transformers' CLIPTokenizer from vocab.json + merges.txt built here from the shipped gz."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("clip_tokenizer")
    tokens, merges = _reference_vocabulary(VOCAB_PATH)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}),
                                          encoding="utf-8")
    merge_lines = "\n".join(" ".join(pair) for pair in merges)
    (directory / "merges.txt").write_text(f"#version: 0.2\n{merge_lines}\n", encoding="utf-8")
    return transformers.CLIPTokenizer.from_pretrained(str(directory))


def _reference_vocabulary(path: Path) -> tuple[list[str], list[tuple[str, ...]]]:
    """The vocabulary as OpenAI CLIP builds it, written independently of the module."""
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    keep = [b for b in range(256) if chr(b).isprintable() and chr(b) != " " and b != 0xAD]
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    symbols = [mapping[b] for b in keep] + [mapping[b] for b in range(256) if b not in keep]
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    return tokens + ["<|startoftext|>", "<|endoftext|>"], merges


def test_vocabulary_has_clip_layout() -> None:
    vocabulary = BpeVocabulary.load()
    assert len(vocabulary.tokens) == 49408
    assert len(vocabulary.merges) == 48894
    assert vocabulary.tokens[:3] == ("!", '"', "#")
    assert vocabulary.tokens[256] == "!</w>"
    assert vocabulary.tokens[START_TOKEN] == "<|startoftext|>"
    assert vocabulary.tokens[END_TOKEN] == "<|endoftext|>"


def test_vocabulary_matches_independent_construction() -> None:
    tokens, merges = _reference_vocabulary(VOCAB_PATH)
    vocabulary = BpeVocabulary.load()
    assert list(vocabulary.tokens) == tokens
    assert list(vocabulary.merges) == merges


def test_known_token_ids(bpe: ClipBpe) -> None:
    # published CLIP token ids (the HF CLIP docs' example and common tokenizer tests)
    assert bpe.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert bpe.encode("a photo of a dog") == [320, 1125, 539, 320, 1929]
    assert bpe.encode("Hello, world!") == [3306, 267, 1002, 256]
    assert bpe.encode("A PHOTO of  a Cat!") == [320, 1125, 539, 320, 2368, 256]


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 200


def test_token_ids_match_transformers_on_corpus(bpe: ClipBpe, hf_tokenizer) -> None:
    mismatches = []
    for prompt in CORPUS:
        expected = hf_tokenizer(prompt)["input_ids"][1:-1]
        if bpe.encode(prompt) != expected:
            mismatches.append(prompt)
    assert not mismatches, f"{len(mismatches)} prompts differ, e.g. {mismatches[:5]!r}"


def test_html_unescape_option_matches_openai_cleanup(hf_tokenizer) -> None:
    openai_style = ClipBpe(BpeVocabulary.load(), unescape_html=True)
    for prompt in CORPUS:
        unescaped = html.unescape(html.unescape(prompt))
        assert openai_style.encode(prompt) == hf_tokenizer(unescaped)["input_ids"][1:-1], prompt
    assert openai_style.encode("&amp;amp;") == openai_style.encode("&")


def test_default_cleanup_keeps_html_entities_like_comfyui(bpe: ClipBpe) -> None:
    assert bpe.encode("&amp;") != bpe.encode("&")


def test_bpe_cache_builds_once() -> None:
    cache = BpeCache()
    assert cache.get() is cache.get()


def _ids(window: tuple) -> list:
    return [token for token, _ in window]


def test_empty_prompt_gives_one_padded_window(bpe: ClipBpe) -> None:
    result = ClipTokenizer(bpe, CLIP_L_WINDOWS).tokenize("")
    assert len(result.windows) == 1
    assert _ids(result.windows[0]) == [START_TOKEN, END_TOKEN] + [END_TOKEN] * 75


def test_openclip_windows_pad_with_zero(bpe: ClipBpe) -> None:
    result = ClipTokenizer(bpe, OPENCLIP_WINDOWS).tokenize("a photo of a cat")
    assert _ids(result.windows[0]) == [START_TOKEN, 320, 1125, 539, 320, 2368, END_TOKEN] + [0] * 70


def test_clip_l_windows_pad_with_end_token(bpe: ClipBpe) -> None:
    result = ClipTokenizer(bpe, CLIP_L_WINDOWS).tokenize("a photo of a cat")
    assert _ids(result.windows[0])[6:] == [END_TOKEN] * 71


@pytest.mark.parametrize("spec", [CLIP_L_WINDOWS, OPENCLIP_WINDOWS])
def test_long_prompt_fills_77_token_windows(bpe: ClipBpe, spec: WindowSpec) -> None:
    prompt = "cat " * 200  # one text segment: ComfyUI splits it exactly every 75 tokens
    result = ClipTokenizer(bpe, spec).tokenize(prompt)
    assert len(result.windows) == 3
    for window in result.windows:
        assert len(window) == CONTEXT_LENGTH
        assert window[0] == (START_TOKEN, 1.0)
    assert _ids(result.windows[0])[1:76] == [2368] * 75
    assert _ids(result.windows[1])[76] == END_TOKEN
    last = _ids(result.windows[2])
    assert last[1:51] == [2368] * 50 and last[51] == END_TOKEN
    assert last[52:] == [spec.pad_token] * 25


def test_short_group_moves_whole_to_next_window() -> None:
    groups = [[(1, 1.0)] * 70, [(2, 1.3)] * 7]  # 7 < 8 tokens: kept together
    windows = split_into_windows(groups, CLIP_L_WINDOWS)
    assert [token for token, _ in windows[0]] == [START_TOKEN] + [1] * 70 + [END_TOKEN] * 6
    assert [token for token, _ in windows[1]][:9] == [START_TOKEN] + [2] * 7 + [END_TOKEN]
    assert windows[1][1] == (2, 1.3)


def test_long_group_is_split_at_the_window_edge() -> None:
    groups = [[(1, 1.0)] * 70, [(2, 1.0)] * 8]  # 8 tokens: fills the window, continues
    windows = split_into_windows(groups, OPENCLIP_WINDOWS)
    assert [token for token, _ in windows[0]] == [START_TOKEN] + [1] * 70 + [2] * 5 + [END_TOKEN]
    assert [token for token, _ in windows[1]][:5] == [START_TOKEN, 2, 2, 2, END_TOKEN]


def test_weighted_segments_keep_their_tokens_together(bpe: ClipBpe) -> None:
    prompt = "cat " * 74 + "(red car:1.2)"  # the group "red car" would straddle 75
    result = ClipTokenizer(bpe, CLIP_L_WINDOWS).tokenize(prompt)
    assert len(result.windows) == 2
    assert _ids(result.windows[0])[74:] == [2368, END_TOKEN, END_TOKEN]
    assert result.windows[1][1:3] == ((736, pytest.approx(1.2)), (1615, pytest.approx(1.2)))


def test_weights_ride_on_their_tokens(bpe: ClipBpe) -> None:
    window = ClipTokenizer(bpe, CLIP_L_WINDOWS).tokenize("a (cat:1.5) photo").windows[0]
    assert window[:5] == ((START_TOKEN, 1.0), (320, 1.0), (2368, 1.5), (1125, 1.0),
                          (END_TOKEN, 1.0))
