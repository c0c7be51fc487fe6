"""Writing a model as an HF folder: model.safetensors (sharded above max_shard_size) + its config.json."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5's default
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}
_OUR_FILES = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def parse_size(size: int | str) -> int:
    """Bytes from an int or "500MB" / "5GB" / "2GiB" (decimal units as in transformers, binary with an i)."""
    if isinstance(size, int) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size {size!r} is not a size; accepted: a positive int of bytes or a string "
                         "like '500MB', '5GB', '2GiB'")
    return int(float(match[1]) * _UNITS[match[2]])


def save_pretrained(model, folder: str | Path, max_shard_size: int | str | None = None) -> Path:
    """Write `model` so that transformers' class of its architecture (config.json names it) loads the same weights."""
    from llamaviz.llama.quantize import quantization_of

    if quantization_of(model) is not None:
        raise ValueError(f"cannot save a quantized model ({quantization_of(model)}) as a transformers checkpoint; "
                         "save the unquantized model and pass quantization= when loading it")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = tensors_to_save(model)
    shards = _split(state, parse_size(max_shard_size or DEFAULT_MAX_SHARD_SIZE))
    _remove_previous_weights(folder)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        _save_shards(shards, folder)
    dtype = next(iter(state.values())).dtype if state else torch.float32
    config = dataclasses.replace(model.config, torch_dtype=str(dtype).removeprefix("torch."))
    config.save_pretrained(folder)
    return folder


def tensors_to_save(model) -> dict[str, torch.Tensor]:
    """The state dict as safetensors wants it: on CPU, contiguous, no shared storage, no tied lm_head."""
    tied = model.config.tie_word_embeddings
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tied and name.endswith("lm_head.weight"):
            continue  # transformers re-ties it from embed_tokens
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            tensor = tensor.clone()  # safetensors refuses two names over one storage
        seen.add(tensor.untyped_storage().data_ptr())
        state[name] = tensor
    return state


def _split(state: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """Greedy shards of at most `limit` bytes, in state-dict order (a bigger tensor gets a shard of its own)."""
    shards, size = [{}], 0
    for name, tensor in state.items():
        if shards[-1] and size + tensor.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    return shards


def _save_shards(shards: list[dict[str, torch.Tensor]], folder: Path) -> None:
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
        total += sum(tensor.nbytes for tensor in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _remove_previous_weights(folder: Path) -> None:
    """Delete model*.safetensors files of an earlier save, so a stale index cannot shadow the new weights."""
    for file in folder.iterdir():
        if file.is_file() and _OUR_FILES.fullmatch(file.name):
            file.unlink()
