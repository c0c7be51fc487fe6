"""Meta's original Llama format: params.json + consolidated.NN.pth (model-parallel shards) + tokenizer.model."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch

from llamaviz.checkpoints.base import Checkpoint, TensorInfo, first_float_dtype, hf_rope_layout
from llamaviz.llama.config import LlamaConfig

_TOP_LEVEL = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_PER_LAYER = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_NOT_WEIGHTS = {"rope.freqs"}  # old checkpoints store the RoPE frequencies; the model recomputes them
# Model-parallel layout (fairscale): column-parallel layers are split along dim 0 (output rows),
# row-parallel ones along dim 1 (inputs), norms are replicated. The embedding is split along the
# hidden dim in Llama 1/2 and along the vocabulary in Llama 3: its shard shape tells which.
_ROW_PARALLEL = (".attention.wo.", ".feed_forward.w2.")
_REPLICATED = ("norm.weight",)
# Llama 3.1's scaling (params.json says only "use_scaled_rope": true); Meta's reference code hard-codes it
_LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}


def is_meta_folder(folder: Path) -> bool:
    return (folder / "params.json").is_file() and any(folder.glob("consolidated.*.pth"))


def hf_tensor_name(meta_name: str) -> str | None:
    """Meta's key -> HF key ("layers.3.attention.wq.weight" -> "model.layers.3.self_attn.q_proj.weight")."""
    if meta_name in _NOT_WEIGHTS:
        return None
    if meta_name in _TOP_LEVEL:
        return _TOP_LEVEL[meta_name]
    match = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", meta_name)
    if match and match[2] in _PER_LAYER:
        return f"model.layers.{match[1]}.{_PER_LAYER[match[2]]}.{match[3]}"
    return meta_name  # unknown: reported as unexpected when loading


def _concat_dim(meta_name: str, shard_shape: torch.Size, dim: int) -> int | None:
    """Which dim the model-parallel shards of this tensor are concatenated along (None: replicated)."""
    if meta_name.endswith(_REPLICATED) or len(shard_shape) == 1:
        return None
    if meta_name == "tok_embeddings.weight":
        return 1 if shard_shape[1] != dim else 0
    return 1 if any(part in f".{meta_name}" for part in _ROW_PARALLEL) else 0


def config_from_params(params: dict, shapes: dict[str, tuple[int, ...]]) -> LlamaConfig:
    """params.json -> LlamaConfig; vocab and MLP width come from the weights when params.json leaves them out."""
    dim, heads = params["dim"], params["n_heads"]
    vocab = params.get("vocab_size", -1)
    scaled = params.get("use_scaled_rope", False)
    theta = params.get("rope_theta", 10000.0)
    # Meta's params.json has no context length: Llama 3.1 (scaled) 128k, Llama 3 8k, Llama 2 4k
    context = params.get("max_seq_len") or (131072 if scaled else 8192 if theta >= 500000 else 4096)
    return LlamaConfig(
        vocab_size=vocab if vocab > 0 else shapes["model.embed_tokens.weight"][0],
        hidden_size=dim,
        intermediate_size=_intermediate_size(params, shapes),
        num_hidden_layers=params["n_layers"],
        num_attention_heads=heads,
        num_key_value_heads=params.get("n_kv_heads") or heads,
        head_dim=dim // heads,
        rms_norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=dict(_LLAMA31_SCALING) if scaled else None,
        max_position_embeddings=context,
        tie_word_embeddings="lm_head.weight" not in shapes,
        **_special_ids(vocab if vocab > 0 else shapes["model.embed_tokens.weight"][0]),
    )


def _intermediate_size(params: dict, shapes: dict[str, tuple[int, ...]]) -> int:
    """The MLP width: w1's rows, or Meta's rule (2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of)."""
    if "model.layers.0.mlp.gate_proj.weight" in shapes:
        return shapes["model.layers.0.mlp.gate_proj.weight"][0]
    width = int(2 * 4 * params["dim"] / 3)
    if params.get("ffn_dim_multiplier") is not None:
        width = int(params["ffn_dim_multiplier"] * width)
    multiple = params.get("multiple_of", 256)
    return multiple * -(-width // multiple)


def _special_ids(vocab: int) -> dict:
    """bos/eos ids: Llama 3's tiktoken vocabulary or the SentencePiece one of Llama 1/2."""
    if vocab >= 128256:
        return {"bos_token_id": 128000, "eos_token_id": 128001}
    return {"bos_token_id": 1, "eos_token_id": 2}


class MetaCheckpoint(Checkpoint):
    """consolidated.NN.pth shards, joined along their model-parallel dims, q/k rows un-permuted."""

    format = "meta"

    def __init__(self, folder: Path):
        folder = Path(folder)
        self.files = sorted(folder.glob("consolidated.*.pth"))
        params = self._params(folder / "params.json")
        shards = [_load_pth(file) for file in self.files]
        self._layout = {name: _concat_dim(name, tensor.shape, params["dim"]) for name, tensor in shards[0].items()}
        infos = {hf: self._info(name, shards) for name in shards[0] if (hf := hf_tensor_name(name))}
        try:
            config = config_from_params(params, {name: info.shape for name, info in infos.items()})
        except (KeyError, ValueError) as err:
            raise ValueError(f"{folder / 'params.json'}: cannot build a config: {err!r}") from None
        config.name_or_path = str(folder)
        source_dtype = first_float_dtype(tensor.dtype for tensor in shards[0].values())
        super().__init__(folder, config, source_dtype, folder, infos)

    @staticmethod
    def _params(path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None

    def _info(self, name: str, shards: list[dict[str, torch.Tensor]]) -> TensorInfo:
        shape = list(shards[0][name].shape)
        dim = self._layout[name]
        if dim is not None:
            shape[dim] = sum(shard[name].shape[dim] for shard in shards)
        nbytes = sum(shard[name].nbytes for shard in shards) if dim is not None else shards[0][name].nbytes
        return TensorInfo(tuple(shape), nbytes, self.files[0])

    def _read(self, wanted: set[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
        shards = [_load_pth(file) for file in self.files]
        for name, dim in self._layout.items():
            hf = hf_tensor_name(name)
            if hf is None or (wanted is not None and hf not in wanted):
                continue
            pieces = [shard[name] for shard in shards]
            tensor = pieces[0] if dim is None else torch.cat(pieces, dim=dim)
            yield hf, hf_rope_layout(hf, tensor, self.config)



def _load_pth(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ValueError(f"{file} could not be read with torch.load(weights_only=True): {err}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{file} holds a {type(state).__name__}, not a state dict of tensors")
    return state
