"""GGML block dequantization in torch: the common GGUF types, bit-exact with gguf.quants.dequantize.

gguf's numpy code is the reference and the fallback for every other type it supports. Each kernel
below does the same float32 operations in the same order (a multiply, then an add or subtract; no
fused multiply-add), so results equal gguf's exactly; tests/test_checkpoints.py checks that.
Layouts: a block of `block_size` weights is `type_size` bytes; n = number of blocks.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

QK_K = 256  # weights per K-quant super-block


def _half(blocks: torch.Tensor, start: int, count: int = 1) -> torch.Tensor:
    """float16 scale(s) stored at byte `start` of each block, as float32: [n, count]."""
    return blocks[:, start:start + 2 * count].contiguous().view(torch.float16).float()


def _shifted(packed: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """Bit fields of packed bytes: [n, c, k] -> [n, c, len(shifts), k], (byte >> shift) & mask."""
    shift = torch.tensor(shifts, dtype=torch.uint8).view(1, 1, -1, 1)
    return (packed.unsqueeze(2) >> shift) & mask


def _low_high_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] packed bytes -> [n, 32] 4-bit values: low nibbles are weights 0-15, high ones 16-31."""
    return _shifted(qs.unsqueeze(1), [0, 4], 0x0F).reshape(qs.shape[0], -1)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes (a little-endian uint32) -> [n, 32] bits, bit i belongs to weight i."""
    return _shifted(qh.unsqueeze(1), list(range(8)), 0x01).transpose(2, 3).reshape(qh.shape[0], 32)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """34 bytes: f16 scale d, 32 int8 -> d * q."""
    return blocks[:, 2:].view(torch.int8).float() * _half(blocks, 0)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """18 bytes: f16 d, 16 bytes of nibbles -> d * (q - 8)."""
    q = (_low_high_nibbles(blocks[:, 2:]).view(torch.int8) - 8).float()  # [n, 32]
    return _half(blocks, 0) * q


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """20 bytes: f16 d, f16 min m, 16 bytes of nibbles -> d * q + m."""
    q = _low_high_nibbles(blocks[:, 4:]).float()  # [n, 32]
    return _half(blocks, 0) * q + _half(blocks, 2)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """22 bytes: f16 d, 4 bytes of fifth bits, 16 bytes of nibbles -> d * (q - 16)."""
    q = _low_high_nibbles(blocks[:, 6:]) | (_fifth_bits(blocks[:, 2:6]) << 4)  # [n, 32]
    return _half(blocks, 0) * (q.view(torch.int8) - 16).float()


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """24 bytes: f16 d, f16 min m, 4 bytes of fifth bits, 16 bytes of nibbles -> d * q + m."""
    q = _low_high_nibbles(blocks[:, 8:]) | (_fifth_bits(blocks[:, 4:8]) << 4)  # [n, 32]
    return _half(blocks, 0) * q.float() + _half(blocks, 2)


def _k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes of 6-bit values -> 8 sub-block scales and 8 mins, each [n, 8] uint8."""
    d, m, md = packed.reshape(-1, 3, 4).unbind(1)  # [n, 4] each
    scales = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return scales, mins


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """144 bytes: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles (8 x 32 weights)."""
    n = blocks.shape[0]
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    d = (_half(blocks, 0) * scales.float()).view(n, 8, 1)
    dm = (_half(blocks, 2) * mins.float()).view(n, 8, 1)
    q = _shifted(blocks[:, 16:].reshape(n, 4, 32), [0, 4], 0x0F).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """176 bytes: as Q4_K plus 32 bytes holding the fifth bit of every weight."""
    n = blocks.shape[0]
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    d = (_half(blocks, 0) * scales.float()).view(n, 8, 1)
    dm = (_half(blocks, 2) * mins.float()).view(n, 8, 1)
    low = _shifted(blocks[:, 48:].reshape(n, 4, 32), [0, 4], 0x0F).reshape(n, 8, 32)
    high = _shifted(blocks[:, 16:48].reshape(n, 1, 32), list(range(8)), 0x01).reshape(n, 8, 32)
    return (d * (low | (high << 4)).float() - dm).reshape(n, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """210 bytes: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, f16 d."""
    n = blocks.shape[0]
    low = _shifted(blocks[:, :128].reshape(n, 2, 64), [0, 4], 0x0F).reshape(n, 8, 32)
    high = _shifted(blocks[:, 128:192].reshape(n, 2, 32), [0, 2, 4, 6], 0x03).reshape(n, 8, 32)
    q = ((low | (high << 4)).view(torch.int8) - 32).reshape(n, 16, 16).float()
    d = (_half(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()).view(n, 16, 1)
    return (d * q).reshape(n, QK_K)


_KERNELS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q5_0: _q5_0,
    GGMLQuantizationType.Q5_1: _q5_1,
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q5_K: _q5_k,
    GGMLQuantizationType.Q6_K: _q6_k,
}
_FLOATS = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
           GGMLQuantizationType.BF16: torch.bfloat16}


def tensor_nbytes(ggml_type: GGMLQuantizationType, numel: int) -> int:
    """Bytes a tensor of `numel` weights takes in a GGUF file."""
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    return numel // block_size * type_size


@lru_cache(maxsize=None)
def can_dequantize(ggml_type: GGMLQuantizationType) -> bool:
    """Whether torch kernels here or gguf's numpy code can turn this type into float32."""
    if ggml_type in _KERNELS or ggml_type in _FLOATS:
        return True
    try:
        gguf_dequantize(np.zeros((1, GGML_QUANT_SIZES[ggml_type][1]), dtype=np.uint8), ggml_type)
    except Exception:  # NotImplementedError, or a type gguf lists but cannot decode
        return False
    return True


def supported_types() -> list[str]:
    """Names of every GGML type that dequantizes, for error messages."""
    return [t.name for t in GGMLQuantizationType if t in GGML_QUANT_SIZES and can_dequantize(t)]


def dequantize(raw: np.ndarray, ggml_type: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw bytes of one GGUF tensor -> float32 tensor of `shape` (row-major, last dim = GGUF's ne0).

    Runs on one intra-op thread: these are many short element-wise ops, and on a busy machine the
    thread team's hand-offs cost more than the work (default model, 2 shared cores: 7-16 s on two
    threads vs 0.85 s on one; on an idle machine 0.36 s vs 0.46 s).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _dequantize(raw.reshape(-1).view(np.uint8), ggml_type, shape)
    finally:
        torch.set_num_threads(threads)


def _dequantize(raw: np.ndarray, ggml_type: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    if ggml_type == GGMLQuantizationType.F32:
        return torch.from_numpy(raw).view(torch.float32).clone().reshape(shape)  # own memory, not the file's
    if ggml_type in _FLOATS:
        return torch.from_numpy(raw).view(_FLOATS[ggml_type]).float().reshape(shape)
    if ggml_type in _KERNELS:
        blocks = torch.from_numpy(raw).view(-1, GGML_QUANT_SIZES[ggml_type][1])  # [n, type_size]
        return _KERNELS[ggml_type](blocks).reshape(shape)
    rows = raw.reshape(-1, tensor_nbytes(ggml_type, shape[-1]))  # [rows, bytes per row]
    return torch.from_numpy(np.ascontiguousarray(gguf_dequantize(rows, ggml_type))).reshape(shape)
