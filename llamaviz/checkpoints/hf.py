"""Hugging Face checkpoint folders: config.json + safetensors or pytorch_model*.bin, sharded or not."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from llamaviz.checkpoints.base import Checkpoint, TensorInfo, dtype_from_config, first_float_dtype
from llamaviz.llama.config import LlamaConfig

# (format, single file, shard index), in the order transformers prefers them
WEIGHT_FILES = (
    ("safetensors", "model.safetensors", "model.safetensors.index.json"),
    ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def find_weight_files(folder: Path) -> tuple[str, list[Path]]:
    """An HF folder's weight format and files (shards in order); FileNotFoundError naming what was looked for."""
    for weight_format, single, index in WEIGHT_FILES:
        if (folder / index).is_file():
            return weight_format, _shards_of(folder / index)
        if (folder / single).is_file():
            return weight_format, [folder / single]
    accepted = ", ".join(name for _, single, index in WEIGHT_FILES for name in (single, index))
    raise FileNotFoundError(f"no weights in {folder}; looked for {accepted}")


def _shards_of(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index} is not a shard index (JSON with a 'weight_map'): {err}") from None
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    for shard in shards:
        if not shard.is_file():
            raise FileNotFoundError(f"{index} lists shard {shard.name}, which is missing from {index.parent}")
    return shards


def read_hf_config(folder: Path) -> LlamaConfig:
    """config.json -> LlamaConfig (both rope spellings are read by LlamaConfig.from_dict)."""
    config_path = folder / "config.json"
    try:
        config = LlamaConfig.from_pretrained(folder)
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}") from None
    config.name_or_path = str(folder)
    return config


# ----- the tensor table against the config, before anything is built -----

HF_FIELDS = {"layers": "num_hidden_layers", "vocab": "vocab_size"}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_tensor_table(source, config: LlamaConfig, infos: dict, fields: dict[str, str] = HF_FIELDS) -> None:
    """ValueError naming the config field when the file cannot hold the model the config describes.

    Runs on the header alone, before a model is built: a config claiming a million layers, or a
    vocabulary its embedding does not have, fails here in milliseconds instead of after building
    that model (other shapes are checked by the loader against the model built on the meta device,
    which costs no memory). `fields` names the fields as the file spells them.
    """
    layers = {int(match.group(1)) for name in infos if (match := _LAYER.search(name))}
    count = config.num_hidden_layers
    missing = [i for i in range(count) if i not in layers]
    if missing:
        held = f"layers {min(layers)}..{max(layers)}" if layers else "no layers"
        raise ValueError(f"{source}: {fields['layers']} is {count:,} but the file's tensors hold {held} "
                         f"({len(missing):,} layers missing, e.g. layer {missing[0]}); accepted: the number of "
                         "layers whose weights the file holds")
    embed = infos.get("model.embed_tokens.weight") or infos.get("embed_tokens.weight")
    if embed is not None and embed.shape and embed.shape[0] != config.vocab_size:
        raise ValueError(f"{source}: {fields['vocab']} is {config.vocab_size:,} but the token embedding has "
                         f"{embed.shape[0]:,} rows (shape {tuple(embed.shape)})")


class SafetensorsCheckpoint(Checkpoint):
    """model.safetensors or its shards, read through safe_open (memory-mapped)."""

    format = "safetensors"
    fresh_tensors = True  # get_tensor copies out of the mapping: each tensor owns exactly its bytes

    def __init__(self, folder: Path, files: list[Path]):
        config = read_hf_config(folder)
        infos, dtypes = {}, []
        for file in files:
            with _open_safetensors(file) as handle:
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    shape, dtype = tuple(piece.get_shape()), _SAFETENSORS_DTYPES.get(piece.get_dtype())
                    dtypes.append(dtype or torch.uint8)
                    infos[name] = TensorInfo(shape, _nbytes(shape, dtype), file)
        check_tensor_table(folder / "config.json", config, infos)
        source_dtype = dtype_from_config(config) or first_float_dtype(dtypes)
        super().__init__(folder, config, source_dtype, folder, infos)
        self.files = files

    def _read(self, wanted: set[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
        for file in self.files:
            with _open_safetensors(file) as handle:
                for name in handle.keys():
                    if wanted is None or name in wanted:
                        yield name, handle.get_tensor(name)


def _open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {err}") from None


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype | None) -> int:
    return math.prod(shape) * (dtype.itemsize if dtype is not None else 1)


class BinCheckpoint(Checkpoint):
    """pytorch_model.bin or its shards, read with torch.load(weights_only=True, mmap=True) and nothing else."""

    format = "bin"

    def __init__(self, folder: Path, files: list[Path]):
        config = read_hf_config(folder)
        infos, dtypes = {}, []
        for file in files:
            for name, tensor in _load_bin(file).items():
                dtypes.append(tensor.dtype)
                infos[name] = TensorInfo(tuple(tensor.shape), tensor.nbytes, file)
        check_tensor_table(folder / "config.json", config, infos)
        source_dtype = dtype_from_config(config) or first_float_dtype(dtypes)
        super().__init__(folder, config, source_dtype, folder, infos)
        self.files = files

    def _read(self, wanted: set[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
        for file in self.files:
            for name, tensor in _load_bin(file).items():
                if wanted is None or name in wanted:
                    yield name, tensor


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .bin file: tensors only (weights_only=True), memory-mapped where the format allows."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):  # legacy (pre-zip) files cannot be memory-mapped
            raise ValueError(f"{file} is not a readable PyTorch weights file (truncated or corrupt?): {err}") from None
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for anything but plain tensors, EOFError, zip errors
        raise ValueError(f"{file} could not be read with torch.load(weights_only=True): {err}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{file} holds a {type(state).__name__}, not a state dict of tensors")
    return {name: tensor for name, tensor in state.items() if isinstance(tensor, torch.Tensor)}


def open_hf_folder(folder: Path) -> Checkpoint:
    """The Checkpoint for an HF folder, in whichever weight format it holds."""
    weight_format, files = find_weight_files(folder)
    reader = SafetensorsCheckpoint if weight_format == "safetensors" else BinCheckpoint
    return reader(folder, files)
