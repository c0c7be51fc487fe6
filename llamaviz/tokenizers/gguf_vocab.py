"""Tokenizers from the vocabulary in a GGUF file's metadata (llama.cpp's `tokenizer.ggml.*` keys).

"gpt2" (byte-level BPE, the default model) becomes a tokenizers.Tokenizer built the way transformers'
GGUF converter builds it, so ids match; "llama" (SentencePiece) becomes a SentencePiece model proto.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from llamaviz.tokenizers.spm_proto import PIECE_CONTROL, PIECE_UNKNOWN, PIECE_USER_DEFINED, build_model_proto

SUPPORTED_GGUF_TOKENIZERS = ("gpt2", "llama")
_SPECIAL_ID_KEYS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                    "pad_token": "padding_token_id"}

# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (the same as transformers' GGUF converter uses);
# types not listed ("smollm", "gpt2", ...) get GPT-2's ByteLevel regex, as there.
_TAIL = r"|\s*[\r\n]+|\s+(?!\S)|\s+"  # newlines, then trailing and other whitespace
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*" + _TAIL
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*" + _TAIL
_QWEN35 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*" + _TAIL
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_WORD_START = r"[^\r\n\p{L}\p{N}]?"
_TEKKEN = (f"{_WORD_START}{_UPPER}*{_LOWER}+|{_WORD_START}{_UPPER}+{_LOWER}*"
           + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*" + _TAIL)
_GPT4O = (f"{_WORD_START}{_UPPER}*{_LOWER}+{_CONTRACTIONS}?|{_WORD_START}{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
          + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*" + _TAIL)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
}


def read_tokenizer_fields(path: str | Path) -> dict[str, Any]:
    """The `tokenizer.*` metadata of a GGUF file (llamaviz's header parser: ~0.1 s for 49k tokens + merges)."""
    from llamaviz.checkpoints.gguf_header import gguf_metadata

    return {key: value for key, value in gguf_metadata(path).items() if key.startswith("tokenizer.")}


def tokenizer_model(fields: dict[str, Any], path) -> str:
    """`tokenizer.ggml.model`, checked to be one llamaviz reads."""
    model = fields.get("tokenizer.ggml.model")
    if model is None:
        raise ValueError(f"{path}: the GGUF metadata has no tokenizer.ggml.model, so it carries no tokenizer")
    if model not in SUPPORTED_GGUF_TOKENIZERS:
        raise ValueError(
            f"{path}: tokenizer.ggml.model is {model!r}; llamaviz reads {list(SUPPORTED_GGUF_TOKENIZERS)} "
            "(byte-level BPE and SentencePiece vocabularies)"
        )
    if "tokenizer.ggml.tokens" not in fields:
        raise ValueError(f"{path}: the GGUF metadata has no tokenizer.ggml.tokens, so it carries no tokenizer")
    return model


def tokenizer_kwargs(fields: dict[str, Any]) -> dict[str, Any]:
    """Special tokens, add_bos/eos flags and chat template for the tokenizer classes, from the metadata."""
    tokens = fields["tokenizer.ggml.tokens"]
    kwargs = {}
    for name, key in _SPECIAL_ID_KEYS.items():
        index = fields.get(f"tokenizer.ggml.{key}")
        kwargs[name] = tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None
    # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise; BPE files say.
    kwargs["add_bos_token"] = fields.get("tokenizer.ggml.add_bos_token", fields["tokenizer.ggml.model"] == "llama")
    kwargs["add_eos_token"] = fields.get("tokenizer.ggml.add_eos_token", False)
    kwargs["chat_template"] = fields.get("tokenizer.chat_template")
    return kwargs


def byte_level_tokenizer(fields: dict[str, Any]):
    """A tokenizers.Tokenizer for a "gpt2" vocabulary: BPE + byte-level pre-tokenizer and decoder."""
    from tokenizers import AddedToken, Tokenizer, decoders
    from tokenizers.models import BPE

    tokens, token_types = fields["tokenizer.ggml.tokens"], fields.get("tokenizer.ggml.token_type") or []
    in_alphabet = _byte_level_alphabet_check()
    vocab = {token if in_alphabet(token) else _byte_level_spelling(token): index for index, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ")) for merge in fields.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
                              fuse_unk=False, dropout=None))
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(fields.get("tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()
    # CONTROL tokens are special; one spelled outside the byte alphabet is a llama.cpp mislabel, left out.
    control = [token for token, kind in zip(tokens, token_types) if kind == PIECE_CONTROL and in_alphabet(token)]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control])
    # USER_DEFINED tokens (e.g. "<think>") match whole in text, as llama.cpp does, but are not special.
    user = [token for token, kind in zip(tokens, token_types) if kind == PIECE_USER_DEFINED and token in vocab]
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in user])
    return tokenizer


def _byte_level_pre_tokenizer(pre_type: str | None):
    """ByteLevel with GPT-2's regex, or the split pattern this `tokenizer.ggml.pre` type learned merges with."""
    from tokenizers import Regex, pre_tokenizers

    split = PRE_TOKENIZER_SPLITS.get(pre_type)
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable bytes stand for themselves, the rest move to 256+."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {byte: chr(byte) for byte in printable}, 0
    for byte in range(256):
        if byte not in table:
            table[byte], shifted = chr(256 + shifted), shifted + 1
    return table


@lru_cache(maxsize=1)
def _byte_level_alphabet_check():
    """A predicate: is a token written entirely in the byte-level alphabet?"""
    outside = re.compile("[^" + re.escape("".join(_byte_level_alphabet().values())) + "]")
    return lambda token: outside.search(token) is None


def _byte_level_spelling(token: str) -> str:
    """`token`'s UTF-8 bytes written in the byte-level alphabet (for files that store raw text)."""
    table = _byte_level_alphabet()
    return "".join(table[byte] for byte in token.encode("utf-8"))


def sentencepiece_proto(fields: dict[str, Any]) -> bytes:
    """A SentencePiece BPE ModelProto from a "llama" vocabulary (its piece types use sentencepiece's numbering)."""
    tokens = fields["tokenizer.ggml.tokens"]
    scores = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    keys = {"unk_id": "unknown_token_id", "bos_id": "bos_token_id", "eos_id": "eos_token_id",
            "pad_id": "padding_token_id"}
    ids = {name: fields.get(f"tokenizer.ggml.{key}", -1) for name, key in keys.items()}
    ids = {name: index if 0 <= index < len(tokens) else -1 for name, index in ids.items()}
    if ids["unk_id"] < 0:  # sentencepiece needs an unknown piece: the first one typed UNKNOWN, else id 0
        ids["unk_id"] = next((index for index, kind in enumerate(types) if kind == PIECE_UNKNOWN), 0)
    if ids["pad_id"] in (ids["unk_id"], ids["bos_id"], ids["eos_id"]):
        ids["pad_id"] = -1  # sentencepiece needs distinct ids; pad stays known through tokenizer_kwargs
    charsmap = bytes(byte & 0xFF for byte in fields.get("tokenizer.ggml.precompiled_charsmap") or [])
    return build_model_proto(tokens, scores, types, ids, fields.get("tokenizer.ggml.add_space_prefix", True), charsmap)
