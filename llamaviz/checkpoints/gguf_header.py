"""GGUF headers (llama.cpp) read by our own parser, every count checked against the bytes left.

gguf.GGUFReader builds numpy views per string and takes ~1.6 s on the default model's ~100k
vocabulary and merge strings; this parser takes ~50 ms and returns the same values (tests check
it). A count in the header is checked against the bytes left in the file before it is used (a
409-byte file cannot announce a million tensors or strings), so a hostile file fails at once.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from llamaviz.checkpoints import quants

_STRING, _ARRAY = 8, 9
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_DEFAULT_ALIGNMENT = 32
_MAX_ALIGNMENT = 2**16
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 4  # arrays of arrays of ...: llama.cpp writes one level; deeper is refused, not recursed
# the fewest bytes one item can take: a key/value (8-byte key length, 4-byte type, 1-byte value), a
# tensor entry (name length, dim count, type, offset), a string (its length), an array (type, count)
_MIN_FIELD, _MIN_TENSOR, _MIN_STRING, _MIN_ARRAY = 13, 24, 8, 12
GGUF_FIELDS = {"layers": "llama.block_count", "vocab": "llama.vocab_size (or the tokenizer.ggml.tokens count)"}


def open_gguf(path: str | Path):
    """A gguf.GGUFReader over `path` (memory-mapped); clear errors for a missing or corrupt file."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        return GGUFReader(path)
    except Exception as err:  # the reader raises ValueError/IndexError/struct.error on bad bytes
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt?): {err}") from None


def gguf_metadata(reader_or_path) -> dict[str, Any]:
    """Every key/value field of a GGUF file as plain Python values (strings, numbers, lists)."""
    if isinstance(reader_or_path, (str, Path)):
        return read_gguf_header(reader_or_path).metadata
    metadata = {}
    for name, field in reader_or_path.fields.items():
        if name.startswith("GGUF."):
            continue
        metadata[name] = field.contents()
    return metadata


# ----- the header -----

@dataclass
class GGUFTensor:
    name: str  # llama.cpp's name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # row-major (HF) order: GGUF lists dims fastest-first, this is reversed
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]


class _Cursor:
    """Sequential little-endian reads over the file's bytes."""

    def __init__(self, buffer: memoryview):
        self.buffer, self.pos, self.depth = buffer, 0, 0

    def count(self, what: str, each: int) -> int:
        """A uint64 count of items of at least `each` bytes; ValueError when the rest of the file cannot hold them."""
        count = self.scalar("<Q")
        left = len(self.buffer) - self.pos
        if count * each > left:
            raise ValueError(f"the header announces {count:,} {what}, more than the {left:,} bytes left in the "
                             "file can hold")
        return count

    def scalar(self, fmt: str):
        value = struct.unpack_from(fmt, self.buffer, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        end = self.pos + length
        if end > len(self.buffer):
            raise EOFError("string runs past the end of the file")
        text = str(self.buffer[self.pos:end], "utf-8")
        self.pos = end
        return text

    def value(self, value_type: int):
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type = self.scalar("<I")
            each = np.dtype(_SCALARS[item_type]).itemsize if item_type in _SCALARS else (
                _MIN_STRING if item_type == _STRING else _MIN_ARRAY)
            return self.array(item_type, self.count("array items", each))
        if value_type not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {value_type}")
        return self.scalar(_SCALARS[value_type])

    def array(self, item_type: int, count: int) -> list:
        if item_type in _SCALARS:  # numbers: one numpy read
            dtype = np.dtype(_SCALARS[item_type])
            end = self.pos + count * dtype.itemsize
            if end > len(self.buffer):
                raise EOFError("array runs past the end of the file")
            values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.pos).tolist()
            self.pos = end
            return values
        if item_type == _ARRAY and self.depth >= _MAX_NESTING:
            raise ValueError(f"arrays nested more than {_MAX_NESTING} deep; accepted: up to {_MAX_NESTING}")
        self.depth += 1
        try:
            return [self.value(item_type) for _ in range(count)]
        finally:
            self.depth -= 1


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Metadata and tensor table of a GGUF file; ValueError naming the problem for a corrupt one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    with open(path, "rb") as handle:
        mapped = np.memmap(handle, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    try:
        header = _parse(path, memoryview(mapped))
    except (struct.error, EOFError, UnicodeDecodeError, OverflowError, ValueError, TypeError, RecursionError) as err:
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt?): {err}") from None
    _check_tensor_extents(header, len(mapped))
    return header


def _parse(path: Path, buffer: memoryview) -> GGUFHeader:
    cursor = _Cursor(buffer)
    if bytes(buffer[:4]) != b"GGUF":
        raise ValueError(f"bad magic {bytes(buffer[:4])!r}, expected b'GGUF'")
    cursor.pos = 4
    version = cursor.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported; accepted: 2, 3 (little-endian)")
    n_tensors = cursor.count("tensors", _MIN_TENSOR)
    n_fields = cursor.count("metadata fields", _MIN_FIELD)
    metadata = {}
    for _ in range(n_fields):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalar("<I"))
    if n_tensors * _MIN_TENSOR > len(buffer) - cursor.pos:
        raise ValueError(f"the header announces {n_tensors:,} tensors, more than the {len(buffer) - cursor.pos:,} "
                         "bytes left after the metadata can hold")
    table = [_tensor_entry(cursor) for _ in range(n_tensors)]
    alignment = _alignment(metadata)
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = []
    for name, shape, kind, offset in table:
        if offset % alignment:
            raise ValueError(f"tensor {name!r} starts at offset {offset}, not a multiple of general.alignment "
                             f"{alignment}")
        tensors.append(GGUFTensor(name, shape, kind, data_start + offset, _nbytes(name, kind, shape)))
    return GGUFHeader(path, version, metadata, tensors)


def _alignment(metadata: dict[str, Any]) -> int:
    """general.alignment: a power of two up to 65536 (32 when absent); ValueError naming the field otherwise."""
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if (not isinstance(alignment, int) or isinstance(alignment, bool) or not 0 < alignment <= _MAX_ALIGNMENT
            or alignment & (alignment - 1)):
        raise ValueError(f"general.alignment is {alignment!r}; accepted: a power of two from 1 to {_MAX_ALIGNMENT} "
                         f"stored as an integer (default {_DEFAULT_ALIGNMENT})")
    return alignment


def _tensor_entry(cursor: _Cursor) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
    name = cursor.string()
    n_dims = cursor.scalar("<I")
    if n_dims > _MAX_DIMS:
        raise ValueError(f"tensor {name!r} has {n_dims:,} dimensions; accepted: at most {_MAX_DIMS}")
    dims = [cursor.scalar("<Q") for _ in range(n_dims)]
    type_id, offset = cursor.scalar("<I"), cursor.scalar("<Q")
    try:
        kind = GGMLQuantizationType(type_id)
    except ValueError:
        raise ValueError(f"tensor {name!r} has unknown GGML type id {type_id}") from None
    return name, tuple(reversed(dims)), kind, offset


def _nbytes(name: str, kind: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    if kind not in GGML_QUANT_SIZES:
        raise ValueError(f"tensor {name!r} has GGML type {kind.name}, whose block size gguf does not know")
    block_size = GGML_QUANT_SIZES[kind][0]
    if shape and shape[-1] % block_size:
        raise ValueError(f"tensor {name!r}: row length {shape[-1]} is not a multiple of the "
                         f"{kind.name} block size {block_size}")
    return quants.tensor_nbytes(kind, math.prod(shape))


def _check_tensor_extents(header: GGUFHeader, file_size: int) -> None:
    for tensor in header.tensors:
        if tensor.offset + tensor.nbytes > file_size:
            raise ValueError(
                f"{header.path} is truncated: tensor {tensor.name!r} ends at byte {tensor.offset + tensor.nbytes} "
                f"but the file has {file_size} bytes")


# ----- the config -----


# general.architecture -> the config class; "llama" files of Mistral models become MistralConfig (below)
