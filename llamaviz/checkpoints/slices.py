"""Reading one rank's slice of a checkpoint tensor without reading the rest (tensor-parallel loading).

safetensors: the slice is read straight from the memory-mapped file. GGUF: a slice of whole rows
(q/k/v, gate/up: dim 0) is a contiguous run of quantized rows, dequantized alone; column slices
(o_proj, down_proj: dim 1) cut through quantization blocks, so the tensor is dequantized and cut.
Other formats read the whole tensor and keep the slice.
"""

from __future__ import annotations

import numpy as np
import torch
from safetensors import safe_open

from llamaviz.checkpoints import quants
from llamaviz.checkpoints.base import Checkpoint, unpermute_rope_rows


def read_slice(checkpoint: Checkpoint, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
    """Elements start..stop along `dim` of tensor `name`, in HF layout, as a fresh CPU tensor."""
    if checkpoint.format == "safetensors":
        return _safetensors_slice(checkpoint, name, dim, start, stop)
    if checkpoint.format == "gguf" and dim == 0:
        return _gguf_rows(checkpoint, name, start, stop)
    _, full = next(iter(checkpoint.tensors([name])))
    return full.narrow(dim, start, stop - start).clone()


def _safetensors_slice(checkpoint: Checkpoint, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
    with safe_open(str(checkpoint.infos[name].file), framework="pt", device="cpu") as handle:
        piece = handle.get_slice(name)
        return piece[(slice(None),) * dim + (slice(start, stop),)]


def _gguf_rows(checkpoint, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop of a GGUF tensor; q/k rows (whole heads) get HF's RoPE row order back."""
    source = checkpoint._sources[name]
    row_bytes = source.nbytes // source.shape[0]
    mapped = np.memmap(checkpoint.path, mode="c", offset=source.offset + start * row_bytes,
                       shape=((stop - start) * row_bytes,))
    rows = quants.dequantize(mapped, source.ggml_type, (stop - start, *source.shape[1:]))
    if ".self_attn.q_proj." in name or ".self_attn.k_proj." in name:
        rows = unpermute_rope_rows(rows, (stop - start) // checkpoint.config.head_dim)
    return rows
