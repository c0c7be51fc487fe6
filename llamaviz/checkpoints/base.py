"""What every checkpoint reader shares: the Checkpoint interface and the RoPE row permutation."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import torch

from llamaviz.llama.config import LlamaConfig


class TensorInfo(NamedTuple):
    shape: tuple[int, ...]  # in Hugging Face layout, e.g. [out_features, in_features]
    nbytes: int  # bytes the tensor takes in the file (quantized size for GGUF)
    file: Path  # the file holding it, named in error messages


class Checkpoint:
    """A checkpoint on disk: its config, and its tensors under HF names, streamed one at a time."""

    format: str = ""  # "safetensors" | "bin" | "gguf" | "meta"
    fresh_tensors: bool = False  # tensors() yields new tensors nobody else holds, so a loader may keep them

    def __init__(self, path: Path, config: LlamaConfig, source_dtype: torch.dtype, tokenizer_path: Path,
                 infos: dict[str, TensorInfo]):
        self.path = Path(path)
        self.config = config
        self.source_dtype = source_dtype  # the dtype the weights are stored in (float32 for dequantized GGUF)
        self.tokenizer_path = Path(tokenizer_path)  # what AutoTokenizer reads: a folder or the .gguf file
        self.infos = infos  # HF name -> TensorInfo, in file order

    def tensor_names(self) -> list[str]:
        return list(self.infos)

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data in the checkpoint's files (what a progress bar counts)."""
        return sum(info.nbytes for info in self.infos.values())

    def tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, CPU tensor) pairs one at a time; `names` restricts the stream to those keys."""
        wanted = None if names is None else set(names)
        return self._read(wanted)

    def _read(self, wanted: set[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={str(self.path)!r}, format={self.format!r}, "
                f"tensors={len(self.infos)}, source_dtype={self.source_dtype})")


def unpermute_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Interleaved-RoPE row order (Meta, llama.cpp) -> HF's half-split order, for q/k weights and biases.

    Within each head the d rows are stored as pairs (x0, y0, x1, y1, ...); HF wants (x0, x1, ..., y0, y1, ...).
    """
    rest = weight.shape[1:]
    d = weight.shape[0] // heads
    return weight.reshape(heads, d // 2, 2, *rest).transpose(1, 2).reshape(weight.shape)  # [h*d, ...]


def hf_rope_layout(name: str, weight: torch.Tensor, config) -> torch.Tensor:
    """Restore HF's half-split row order on q (per query head) and k (per kv head); other tensors pass."""
    if ".self_attn.q_proj." in name:
        return unpermute_rope_rows(weight, config.num_attention_heads)
    if ".self_attn.k_proj." in name:
        return unpermute_rope_rows(weight, config.num_key_value_heads)
    return weight


def permute_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's half-split row order -> interleaved (what llama.cpp's and Meta's files hold); inverse of the above."""
    rest = weight.shape[1:]
    d = weight.shape[0] // heads
    return weight.reshape(heads, 2, d // 2, *rest).transpose(1, 2).reshape(weight.shape)  # [h*d, ...]


def first_float_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The first floating dtype among a checkpoint's tensors (float32 when there is none)."""
    return next((dtype for dtype in dtypes if dtype.is_floating_point), torch.float32)


def dtype_from_config(config: LlamaConfig) -> torch.dtype | None:
    """config.json's torch_dtype/dtype as a torch.dtype, or None when absent or not a float type."""
    name = config.torch_dtype
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
