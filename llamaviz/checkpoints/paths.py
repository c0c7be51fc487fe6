"""What a model path is: the one place that says None means the default model, and which kind a path holds.

Every front end (llamaviz.load, pipeline, the terminal visualizer, the CLI, the app) names its model
through `model_path`, and everything that needs to know what is on disk asks `checkpoint_kind`, so a
path means the same thing everywhere. Nothing here reads tensor data.
"""

from __future__ import annotations

from pathlib import Path

from llamaviz.checkpoints.hf import WEIGHT_FILES
from llamaviz.checkpoints.meta import is_meta_folder

ACCEPTED = ("an HF folder (config.json with model.safetensors, model.safetensors.index.json or "
            "pytorch_model.bin(.index.json)), a .gguf file, a folder holding one .gguf, or a Meta folder "
            "(params.json + consolidated.*.pth)")
HF_FILE_SUFFIXES = (".safetensors", ".bin", ".json")  # a file of an HF folder stands for its folder
KINDS = ("gguf", "hf", "meta")


def model_path(path=None) -> Path:
    """The checkpoint a caller named, with ~ expanded; None is the default model's .gguf file.

    FileNotFoundError when the path does not exist (or the default model is not installed).
    """
    if path is None:
        from llamaviz.checkpoints.default import default_model_path

        return default_model_path()
    if not isinstance(path, (str, Path)):
        raise ValueError(f"a model path must be a str or pathlib.Path (or None for the default model); "
                         f"got {type(path).__name__}")
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise FileNotFoundError(f"no checkpoint at {resolved}; expected {ACCEPTED}")
    return resolved


def checkpoint_kind(path) -> str | None:
    """"gguf" | "hf" | "meta" from the names on disk, or None when `path` holds no checkpoint.

    A folder with HF weight files is "hf" even if it also holds a .gguf; a folder whose only weights
    are .gguf files is "gguf" (open_checkpoint asks which one when there are several).
    """
    path = Path(path).expanduser()
    if path.is_file():
        return "gguf" if path.suffix == ".gguf" else "hf" if path.suffix in HF_FILE_SUFFIXES else None
    if not path.is_dir():
        return None
    if is_meta_folder(path):
        return "meta"
    if has_hf_weights(path):
        return "hf"
    if any(path.glob("*.gguf")):
        return "gguf"
    return "hf" if (path / "config.json").is_file() else None


def has_hf_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for _, single, index in WEIGHT_FILES for name in (single, index))
