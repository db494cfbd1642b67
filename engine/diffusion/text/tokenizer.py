"""CLIP's byte-level BPE tokenizer and ComfyUI's 77-token windowing of weighted prompts.

The vocabulary ships in `data/bpe_simple_vocab_16e6.txt.gz` (OpenAI CLIP's file, MIT; see
`data/LICENSE-CLIP-VOCAB.txt`); the BPE mechanics come from the `tokenizers` library, set up
the way transformers' `CLIPTokenizer` sets it up, which is the tokenizer ComfyUI calls.
"""

from __future__ import annotations

import gzip
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from engine.diffusion.text.prompt_weights import (
    EmbeddingFinder,
    PromptPiece,
    parse_weighted_prompt,
    resolve_prompt_pieces,
)

VOCAB_PATH = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
START_TOKEN = 49406  # <|startoftext|>
END_TOKEN = 49407  # <|endoftext|>
CONTEXT_LENGTH = 77  # start + 75 content tokens + end/pad
VOCAB_SIZE = 49408
# 49408 = 256 byte symbols + 256 byte symbols with "</w>" + 48894 merges + 2 special tokens
MERGE_COUNT = VOCAB_SIZE - 2 * 256 - 2
# OpenAI CLIP's pre-tokenizer regex (applied to cleaned, lower-cased text).
CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+"""
)
# ComfyUI keeps a group of fewer tokens than this whole when it would straddle two windows.
SHORT_GROUP_TOKENS = 8

# A prompt token: an int id, or one textual-inversion vector [width], with its weight.
Token = tuple[int | torch.Tensor, float]
Window = list[Token]


def byte_symbols() -> list[str]:
    """GPT-2/CLIP byte -> printable character table, in vocabulary order.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes get characters from 256
    upwards, in byte order. The vocabulary lists the printable ones first.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    shifted = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) for byte in printable] + [chr(256 + n) for n in range(len(shifted))]


@dataclass(frozen=True)
class BpeVocabulary:
    """CLIP's 49408 token strings (index = id) and its 48894 ranked merges."""

    tokens: tuple[str, ...]
    merges: tuple[tuple[str, str], ...]

    @classmethod
    def load(cls, path: Path = VOCAB_PATH) -> BpeVocabulary:
        """Build the vocabulary the way OpenAI CLIP does from its merges file."""
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
        # line 0 is a version header; the merges used are the next MERGE_COUNT lines
        merges = tuple(_merge_pair(line, path) for line in lines[1:1 + MERGE_COUNT])
        if len(merges) != MERGE_COUNT:
            raise ValueError(f"{path} holds {len(merges)} merges, CLIP needs {MERGE_COUNT}; "
                             "restore the file shipped with Loom")
        symbols = byte_symbols()
        tokens = (*symbols, *(s + "</w>" for s in symbols), *(a + b for a, b in merges),
                  "<|startoftext|>", "<|endoftext|>")
        return cls(tokens=tokens, merges=merges)


def _merge_pair(line: str, path: Path) -> tuple[str, str]:
    parts = line.split()
    if len(parts) != 2:
        raise ValueError(f"bad merge line {line!r} in {path}; expected two symbols")
    return parts[0], parts[1]


class ClipBpe:
    """Text -> CLIP token ids (no start/end added), identical to transformers' CLIPTokenizer.

    Text cleanup is that tokenizer's: NFC, whitespace runs -> one space, lower case. OpenAI
    CLIP also html-unescapes twice and runs ftfy; ComfyUI does neither, so that is off by
    default (`unescape_html=True` adds the html step; ftfy is never used).
    """

    def __init__(self, vocabulary: BpeVocabulary, *, unescape_html: bool = False) -> None:
        self.vocabulary = vocabulary
        self.unescape_html = unescape_html
        self._tokenizer = _build_tokenizer(vocabulary)

    @classmethod
    def load(cls, path: Path = VOCAB_PATH, *, unescape_html: bool = False) -> ClipBpe:
        return cls(BpeVocabulary.load(path), unescape_html=unescape_html)

    def encode(self, text: str) -> list[int]:
        if self.unescape_html:
            text = html.unescape(html.unescape(text))
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def token_text(self, token_id: int) -> str:
        return self.vocabulary.tokens[token_id]


def _build_tokenizer(vocabulary: BpeVocabulary) -> Tokenizer:
    vocab = {token: index for index, token in enumerate(vocabulary.tokens)}
    model = BPE(vocab=vocab, merges=list(vocabulary.merges), continuing_subword_prefix="",
                end_of_word_suffix="</w>", fuse_unk=False, unk_token="<|endoftext|>")
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    # literal "<|startoftext|>"/"<|endoftext|>" in a prompt become the special ids, as in CLIP
    tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False)
                                  for text in ("<|startoftext|>", "<|endoftext|>")])
    return tokenizer


class BpeCache:
    """Builds the shipped-vocabulary tokenizer on first use and keeps it (made in main.py)."""

    def __init__(self, path: Path = VOCAB_PATH) -> None:
        self.path = path
        self._bpe: ClipBpe | None = None

    def get(self) -> ClipBpe:
        if self._bpe is None:
            self._bpe = ClipBpe.load(self.path)
        return self._bpe


@dataclass(frozen=True)
class WindowSpec:
    """How one text encoder wants its 77-token windows (ComfyUI's SDTokenizer settings)."""

    pad_token: int  # END_TOKEN for CLIP-L, 0 for the OpenCLIP encoders
    width: int  # encoder width: textual-inversion vectors must match it
    embedding_key: str  # key picked from multi-encoder embedding files ("clip_l", "clip_g")
    context_length: int = CONTEXT_LENGTH


@dataclass(frozen=True)
class TokenizedText:
    """A prompt as windows of exactly `context_length` weighted tokens, plus user warnings."""

    windows: tuple[tuple[Token, ...], ...]
    warnings: tuple[str, ...] = ()


class ClipTokenizer:
    """Prompt text -> weighted 77-token windows for one encoder, as ComfyUI tokenizes."""

    def __init__(self, bpe: ClipBpe, spec: WindowSpec,
                 find_embedding: EmbeddingFinder | None = None) -> None:
        self.bpe = bpe
        self.spec = spec
        self.find_embedding = find_embedding

    def tokenize(self, text: str) -> TokenizedText:
        warnings: list[str] = []
        pieces = resolve_prompt_pieces(parse_weighted_prompt(text), self.find_embedding,
                                       self.spec.embedding_key, self.spec.width, warnings)
        groups = [self._group(piece) for piece in pieces]
        windows = split_into_windows([g for g in groups if g], self.spec)
        return TokenizedText(windows=tuple(tuple(w) for w in windows), warnings=tuple(warnings))

    def empty(self) -> TokenizedText:
        """The empty prompt: one window [start, end, pad...]."""
        return self.tokenize("")

    def _group(self, piece: PromptPiece) -> list[Token]:
        if piece.vectors is not None:
            return [(vector, piece.weight) for vector in piece.vectors]
        return [(token, piece.weight) for token in self.bpe.encode(piece.text)]


def split_into_windows(groups: Sequence[Sequence[Token]], spec: WindowSpec) -> list[Window]:
    """Pack token groups into [start, 75 tokens, end/pad] windows (ComfyUI's rule).

    A group is a text segment's tokens or one embedding's vectors. A group that does not fit
    in the current window moves whole to the next one (the current is closed with end + pad),
    unless it has SHORT_GROUP_TOKENS or more tokens: then it fills the window and continues.
    """
    content = spec.context_length - 2
    windows: list[Window] = []
    current: Window = [(START_TOKEN, 1.0)]
    for group in groups:
        remaining = list(group)
        splittable = len(remaining) >= SHORT_GROUP_TOKENS
        while remaining:
            room = content + 1 - len(current)
            if len(remaining) <= room:
                current.extend(remaining)
                break
            if splittable:
                current.extend(remaining[:room])
                remaining = remaining[room:]
            windows.append(_close_window(current, spec))
            current = [(START_TOKEN, 1.0)]
    windows.append(_close_window(current, spec))
    return windows


def _close_window(window: Window, spec: WindowSpec) -> Window:
    closed = [*window, (END_TOKEN, 1.0)]
    return closed + [(spec.pad_token, 1.0)] * (spec.context_length - len(closed))
