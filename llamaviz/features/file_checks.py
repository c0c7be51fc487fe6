"""Checks on a dictionary's files before anything reads them: where they really are, and what a
safetensors header claims against the file's size. Each failure names the file and what is wrong.

A dictionary is read only from inside the folder it was given: a file there that is a symlink to
somewhere else is refused (naming the link and its target), and so is a dictionary folder under the
models folder (model/ or $LLAMAVIZ_MODEL_DIR) that resolves outside it. A safetensors file starts
with an 8-byte little-endian header length, then that many bytes of JSON, then the tensors' data;
a length past the file's end (a truncated file) or over HEADER_CAP, and a tensor whose data_offsets
run past the end, are refused here rather than inside the safetensors library.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

HEADER_CAP = 100 * 2**20  # bytes of safetensors JSON header accepted (the safetensors library's own cap)
TEXT_CAP = 16 * 2**20  # bytes of cfg.json / config.yaml accepted
MODEL_DIR_ENV = "LLAMAVIZ_MODEL_DIR"


def models_folders() -> list[Path]:
    """The folders dictionaries may not leave: $LLAMAVIZ_MODEL_DIR, the repository's model/, and ./model."""
    folders = [Path(__file__).resolve().parents[2] / "model", Path("model").absolute()]
    if os.environ.get(MODEL_DIR_ENV):
        folders.insert(0, Path(os.environ[MODEL_DIR_ENV]).expanduser().absolute())
    return folders


def _first_link(path: Path, top: Path) -> Path:
    """The first symlink on the way from `top` down to `path` (the one that leads out)."""
    for part in [*reversed(path.parents), path]:
        if part.is_relative_to(top) and part != top and part.is_symlink():
            return part
    return path


def check_folder(folder: Path) -> Path:
    """`folder` resolved; ValueError when it lies under a models folder but resolves outside it."""
    folder = folder.expanduser().absolute()
    resolved = folder.resolve()
    for models in models_folders():
        if folder.is_relative_to(models) and not resolved.is_relative_to(models.resolve()):
            link = _first_link(folder, models)
            raise ValueError(f"{link} is a symlink to {os.readlink(link) if link.is_symlink() else resolved}, "
                             f"which leads out of the models folder {models} (to {resolved}); accepted: dictionary "
                             "folders that lie inside the models folder (copy or move it in)")
    return resolved


def inside(folder: Path, name: str | Path) -> Path:
    """folder/name, refused when it resolves outside `folder` (a symlink out, or ../ in the name)."""
    path = folder / name
    top = folder.resolve()
    if os.path.lexists(path) and not path.resolve().is_relative_to(top):
        link = _first_link(path.absolute(), folder.absolute())
        target = os.readlink(link) if link.is_symlink() else path.resolve()
        raise ValueError(f"{link} is a symlink to {target}, outside the dictionary folder {folder}; accepted: "
                         "files inside the folder (copy the file in)")
    return path


def read_text(path: Path) -> str:
    """A small text file's contents (cfg.json, config.yaml); ValueError when it is over TEXT_CAP or not UTF-8."""
    size = path.stat().st_size
    if size > TEXT_CAP:
        raise ValueError(f"{path} is {size:,} bytes; accepted: at most {TEXT_CAP:,} bytes of configuration")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}): {err.reason}") from None


def check_safetensors(path: Path) -> None:
    """ValueError naming `path` when its header length or a tensor's data_offsets do not fit the file."""
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{path} is truncated: {size} bytes, shorter than the 8-byte safetensors header length")
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > HEADER_CAP:
            raise ValueError(f"{path}: the safetensors header length says {length:,} bytes; accepted: at most "
                             f"{HEADER_CAP:,} (the file is {size:,} bytes)")
        if length > size - 8:
            raise ValueError(f"{path} is truncated: its safetensors header length says {length:,} bytes but only "
                             f"{size - 8:,} follow")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: the safetensors header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header must be a JSON object, got {type(header).__name__}")
    data = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"{path}: tensor {name!r} has no valid data_offsets (accepted: [begin, end] integers)")
        if offsets[1] > data or not 0 <= offsets[0] <= offsets[1]:
            raise ValueError(f"{path} is truncated or corrupt: tensor {name!r} claims bytes {offsets[0]:,}..{offsets[1]:,} "
                             f"of the data but the file holds {data:,}")
