"""GGUF files (llama.cpp): config and dequantized tensors under Hugging Face names.

The header comes from gguf_header.py (our parser, every count checked against the file's size).
Tensor data is memory-mapped and dequantized one tensor at a time. The config a header describes is
checked against its tensor table before a model is built (hf.check_tensor_table), so a hostile file
fails at once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from llamaviz.checkpoints import quants
from llamaviz.checkpoints.base import Checkpoint, TensorInfo, hf_rope_layout
from llamaviz.checkpoints.gguf_header import GGUF_FIELDS, GGUFTensor, read_gguf_header
from llamaviz.checkpoints.hf import check_tensor_table
from llamaviz.llama.config import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

_CONFIG_CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
GGUF_ARCHITECTURES = tuple(_CONFIG_CLASSES)
_LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_PERMUTED_ROPE = {"llama"}  # llama.cpp's converter interleaves the q/k rows of these; qwen2/qwen3 keep HF's order


def config_from_gguf(metadata: dict[str, Any], tensor_names=(), rope_freqs: torch.Tensor | None = None,
                     ) -> LlamaConfig:
    """The config from llama.cpp's `{arch}.*` and `tokenizer.ggml.*` keys, for arch llama, qwen2 or qwen3."""
    arch = metadata.get("general.architecture")
    if arch not in _CONFIG_CLASSES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; accepted: "
                         f"{', '.join(map(repr, GGUF_ARCHITECTURES))} (Mistral files say 'llama')")
    if metadata.get(f"{arch}.expert_count", 0) > 0:
        experts = metadata[f"{arch}.expert_count"]
        raise ValueError(f"this GGUF is a mixture of experts ({arch}.expert_count = {experts}, e.g. Mixtral); "
                         "accepted: dense models")
    heads = _required(metadata, arch, "attention.head_count", "num_attention_heads")
    hidden = _required(metadata, arch, "embedding_length", "hidden_size")
    head_dim = (metadata.get(f"{arch}.attention.key_length") or metadata.get(f"{arch}.rope.dimension_count")
                or hidden // heads)
    config_class, family = _family(metadata, arch)
    return config_class(
        vocab_size=_vocab_size(metadata, arch),
        hidden_size=hidden,
        intermediate_size=_required(metadata, arch, "feed_forward_length", "intermediate_size"),
        num_hidden_layers=_required(metadata, arch, "block_count", "num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=_one_per_model(metadata.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=_required(metadata, arch, "attention.layer_norm_rms_epsilon", "rms_norm_eps"),
        rope_theta=metadata.get(f"{arch}.rope.freq_base", 10000.0),
        rope_scaling=_rope_scaling(metadata, arch, rope_freqs, head_dim),
        max_position_embeddings=_required(metadata, arch, "context_length", "max_position_embeddings"),
        tie_word_embeddings="output.weight" not in tensor_names,  # llama.cpp drops a tied output matrix
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        **family,
    )


def _family(metadata: dict[str, Any], arch: str) -> tuple[type[LlamaConfig], dict]:
    """The config class and its own fields. llama.cpp writes Mistral as 'llama': known by its sliding-window key
    or its name; the window is the file's `llama.attention.sliding_window` (None, full causal, without it)."""
    if arch != "llama":
        return _CONFIG_CLASSES[arch], {}  # llama.cpp runs qwen2/qwen3 files with full causal attention
    window = metadata.get("llama.attention.sliding_window")
    names = f"{metadata.get('general.name', '')} {metadata.get('general.basename', '')}".lower()
    if window is None and "mistral" not in names:
        return LlamaConfig, {}
    return MistralConfig, {"sliding_window": window}


def _required(metadata: dict[str, Any], arch: str, key: str, field: str):
    if f"{arch}.{key}" not in metadata:
        raise ValueError(f"GGUF metadata lacks '{arch}.{key}', needed for LlamaConfig.{field}")
    value = _one_per_model(metadata[f"{arch}.{key}"])
    wanted = float if field == "rms_norm_eps" else int
    if isinstance(value, bool) or not isinstance(value, (int, float) if wanted is float else int) or value <= 0:
        kind = "a positive number" if wanted is float else "a positive integer"
        raise ValueError(f"GGUF metadata '{arch}.{key}' is {value!r}; accepted: {kind} (LlamaConfig.{field})")
    return value


def _one_per_model(value):
    """Some files store a per-layer list; a Llama has one value for every layer."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"per-layer values {value} differ; a Llama uses one value for every layer")
        return value[0]
    return value


def _vocab_size(metadata: dict[str, Any], arch: str) -> int:
    if f"{arch}.vocab_size" in metadata:
        return metadata[f"{arch}.vocab_size"]
    if "tokenizer.ggml.tokens" in metadata:
        return len(metadata["tokenizer.ggml.tokens"])
    raise ValueError(f"GGUF metadata has neither '{arch}.vocab_size' nor 'tokenizer.ggml.tokens'")


def _rope_scaling(metadata: dict[str, Any], arch: str, rope_freqs: torch.Tensor | None, head_dim: int) -> dict | None:
    """rope.scaling.* keys -> HF rope_scaling; a rope_freqs tensor means Llama 3 scaling (llama.cpp stores it so)."""
    if rope_freqs is not None:
        return _llama3_scaling_from_freqs(metadata, rope_freqs, head_dim)
    rope_type = metadata.get(f"{arch}.rope.scaling.type", "none")
    factor = metadata.get(f"{arch}.rope.scaling.factor", metadata.get(f"{arch}.rope.scale_linear"))
    if (rope_type == "none" and factor is None) or factor == 1.0:
        return None
    scaling = {"rope_type": "linear" if rope_type == "none" else rope_type, "factor": factor}
    if f"{arch}.rope.scaling.original_context_length" in metadata:
        scaling["original_max_position_embeddings"] = metadata[f"{arch}.rope.scaling.original_context_length"]
    return scaling  # LlamaConfig rejects the types the model cannot compute (e.g. yarn), naming them


def llama3_rope_factors(scaling: dict, theta: float, head_dim: int) -> torch.Tensor:
    """The per-frequency divisors llama.cpp stores as rope_freqs for Llama 3 scaling: [d/2]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    old = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    smooth = (old / wavelen - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return torch.where(wavelen < old / high, 1.0, torch.where(wavelen > old / low, factor, medium))


def _llama3_scaling_from_freqs(metadata: dict[str, Any], rope_freqs: torch.Tensor, head_dim: int) -> dict:
    """Recover Llama 3 rope_scaling: factor = the largest divisor; Meta's other constants, checked against the file."""
    scaling = {"rope_type": "llama3", "factor": float(rope_freqs.max()), **_LLAMA3_ROPE_DEFAULTS}
    if "llama.rope.scaling.original_context_length" in metadata:
        scaling["original_max_position_embeddings"] = metadata["llama.rope.scaling.original_context_length"]
    expected = llama3_rope_factors(scaling, metadata.get("llama.rope.freq_base", 10000.0), head_dim)
    if expected.shape != rope_freqs.shape or not torch.allclose(expected, rope_freqs.double(), rtol=1e-4):
        raise ValueError(f"the file's rope_freqs tensor does not match Llama 3 rope scaling {scaling}; "
                         "accepted: rope_freqs written by llama.cpp for rope_type 'llama3'")
    return scaling


# ----- the tensors -----

_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PER_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",  # Qwen3's per-head norms
}
_NOT_WEIGHTS = {"rope_freqs.weight"}  # RoPE factors, folded into the config


def hf_tensor_name(gguf_name: str) -> str:
    """llama.cpp tensor name -> HF name ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight").

    Names with no HF counterpart come back unchanged, so loading reports them as unexpected.
    """
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _TOP_LEVEL:
        return f"{_TOP_LEVEL[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _PER_LAYER:
        return f"model.layers.{parts[1]}.{_PER_LAYER[parts[2]]}.{suffix}"
    return gguf_name


class GGUFCheckpoint(Checkpoint):
    """A llama.cpp .gguf file: tensors dequantized to float32 (q/k un-permuted for 'llama' files), one at a time."""

    format = "gguf"
    fresh_tensors = True  # dequantized into new memory (F32 ones are copied out of the file)

    def __init__(self, path: str | Path):
        path = Path(path)
        header = read_gguf_header(path)
        by_name = {tensor.name: tensor for tensor in header.tensors}
        try:
            config = config_from_gguf(header.metadata, tuple(by_name), self._rope_freqs(path, by_name))
        except (ValueError, TypeError) as err:  # TypeError: metadata of the wrong type (e.g. lists of lists)
            raise ValueError(f"{path}: {err}") from None
        config.name_or_path = str(path)
        self._sources = {hf_tensor_name(t.name): t for t in header.tensors if t.name not in _NOT_WEIGHTS}
        _check_dequantizable(path, self._sources.values())
        infos = {name: TensorInfo(t.shape, t.nbytes, path) for name, t in self._sources.items()}
        check_tensor_table(path, config, infos, GGUF_FIELDS)
        super().__init__(path, config, torch.float32, path, infos)
        self.metadata = header.metadata
        self.permuted_rope = header.metadata.get("general.architecture") in _PERMUTED_ROPE

    @staticmethod
    def _rope_freqs(path: Path, by_name: dict[str, GGUFTensor]) -> torch.Tensor | None:
        tensor = by_name.get("rope_freqs.weight")
        if tensor is None:
            return None
        mapped = np.memmap(path, mode="c", offset=tensor.offset, shape=(tensor.nbytes,))
        return quants.dequantize(mapped, tensor.ggml_type, tensor.shape)

    def _read(self, wanted: set[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
        mapped = np.memmap(self.path, mode="c")  # copy-on-write: writable views, nothing copied
        for name, source in self._sources.items():
            if wanted is None or name in wanted:
                raw = mapped[source.offset:source.offset + source.nbytes]
                weight = quants.dequantize(raw, source.ggml_type, source.shape)
                yield name, hf_rope_layout(name, weight, self.config) if self.permuted_rope else weight



def _check_dequantizable(path: Path, tensors) -> None:
    for tensor in tensors:
        if not quants.can_dequantize(tensor.ggml_type):
            raise ValueError(
                f"{path}: tensor {tensor.name!r} has GGML type {tensor.ggml_type.name}, which cannot be "
                f"dequantized; supported: {', '.join(quants.supported_types())}")
