"""SentencePiece model files written by hand: the few protobuf fields a Llama vocabulary needs.

A GGUF "llama" vocabulary is a SentencePiece model taken apart (pieces, scores, piece types with the
same numbering), so putting those back into a ModelProto lets the sentencepiece library run it
exactly. Field numbers are those of sentencepiece_model.proto; no protobuf package is needed.
"""

from __future__ import annotations

import struct

# sentencepiece_model.proto field numbers
_MODEL_PIECES, _MODEL_TRAINER, _MODEL_NORMALIZER = 1, 2, 3
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
_TRAINER_MODEL_TYPE, _TRAINER_BYTE_FALLBACK = 3, 35
_TRAINER_IDS = {"unk_id": 40, "bos_id": 41, "eos_id": 42, "pad_id": 43}
_NORMALIZER_NAME, _NORMALIZER_CHARSMAP, _NORMALIZER_DUMMY_PREFIX, _NORMALIZER_REMOVE_SPACES = 1, 2, 3, 4
MODEL_TYPE_BPE = 2
PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED, PIECE_UNUSED, PIECE_BYTE = 1, 2, 3, 4, 5, 6


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint; negative int32 values take ten bytes (two's complement)."""
    value = value + (1 << 64) if value < 0 else value
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _float_field(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", value)


def build_model_proto(pieces: list[str], scores: list[float], types: list[int], special_ids: dict[str, int],
                      add_dummy_prefix: bool = True, precompiled_charsmap: bytes = b"") -> bytes:
    """A serialized BPE ModelProto; `special_ids` maps unk_id/bos_id/eos_id/pad_id to ids (-1: none)."""
    body = bytearray()
    for text, score, piece_type in zip(pieces, scores, types):
        piece = _bytes_field(_PIECE_TEXT, text.encode("utf-8")) + _float_field(_PIECE_SCORE, score)
        body += _bytes_field(_MODEL_PIECES, piece + _int_field(_PIECE_TYPE, piece_type or PIECE_NORMAL))
    trainer = _int_field(_TRAINER_MODEL_TYPE, MODEL_TYPE_BPE)
    trainer += _int_field(_TRAINER_BYTE_FALLBACK, int(PIECE_BYTE in types))
    for name, number in _TRAINER_IDS.items():
        trainer += _int_field(number, special_ids.get(name, -1))
    normalizer = _bytes_field(_NORMALIZER_NAME, b"identity" if not precompiled_charsmap else b"nmt_nfkc")
    normalizer += _bytes_field(_NORMALIZER_CHARSMAP, precompiled_charsmap)
    normalizer += _int_field(_NORMALIZER_DUMMY_PREFIX, int(add_dummy_prefix))
    normalizer += _int_field(_NORMALIZER_REMOVE_SPACES, 0)
    return bytes(body + _bytes_field(_MODEL_TRAINER, trainer) + _bytes_field(_MODEL_NORMALIZER, normalizer))


def without_dummy_prefix(model_proto: bytes) -> bytes:
    """The same model with add_dummy_prefix off (protobuf merges a repeated sub-message field into the first)."""
    return model_proto + _bytes_field(_MODEL_NORMALIZER, _int_field(_NORMALIZER_DUMMY_PREFIX, 0))
