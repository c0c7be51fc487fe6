"""Harvest once: activations of one or many hook points in one pass over the windows, to memory-mapped
shards on disk, so every layer, width and architecture trains from the same harvest.

A harvest folder holds harvest.json ({hooks, tokens, d, dtype, windows, kept}) and one
{hook}.npy per hook point ([tokens, d], numpy's .npy format, opened with mmap). BOS / EOS / pad
positions are left out unless keep_special. Free disk is checked before anything is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

DTYPES = {"float32": np.float32, "float16": np.float16}
BATCH_WINDOWS = 8


def special_ids(tokenizer) -> list[int]:
    return sorted({i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None})


def harvest(model, tokenizer, windows: torch.Tensor, hooks: list[str], folder, dtype: str = "float32",
            keep_special: bool = False, progress=None) -> Path:
    """Write [tokens, d] activations of every hook to folder; returns the folder."""
    if dtype not in DTYPES:
        raise ValueError(f"harvest dtype {dtype!r} is not supported; accepted: {', '.join(DTYPES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for hook in hooks:
        model._check_name(hook)
    keep = torch.ones_like(windows, dtype=torch.bool) if keep_special else ~torch.isin(windows, torch.tensor(special_ids(tokenizer)))
    tokens = int(keep.sum())
    d = model.config.hidden_size
    need = tokens * d * np.dtype(DTYPES[dtype]).itemsize * len(hooks)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise OSError(f"the harvest needs {need / 2**30:.2f} GiB for {tokens:,} tokens x {len(hooks)} hooks x {d} "
                      f"({dtype}); {folder} has {free / 2**30:.2f} GiB free: fewer --tokens or --dtype float16")
    arrays = {hook: np.lib.format.open_memmap(folder / f"{hook}.npy", mode="w+", dtype=DTYPES[dtype], shape=(tokens, d))
              for hook in hooks}
    written = 0
    with torch.no_grad():
        for start in range(0, len(windows), BATCH_WINDOWS):
            batch, mask = windows[start:start + BATCH_WINDOWS], keep[start:start + BATCH_WINDOWS]
            _, cache = model.run_with_cache(batch, names_filter=hooks)
            rows = int(mask.sum())
            for hook in hooks:
                arrays[hook][written:written + rows] = cache[hook][mask].float().cpu().numpy()
            written += rows
            if progress is not None:
                progress(written, tokens)
    for array in arrays.values():
        array.flush()
    (folder / "harvest.json").write_text(json.dumps({"hooks": hooks, "tokens": tokens, "d": d, "dtype": dtype,
                                                     "windows": len(windows), "keep_special": keep_special}))
    return folder


def open_harvest(folder, hook: str) -> np.ndarray:
    """The [tokens, d] activations of one hook, memory-mapped (read-only)."""
    folder = Path(folder)
    info = json.loads((folder / "harvest.json").read_text())
    if hook not in info["hooks"]:
        raise KeyError(f"the harvest at {folder} has no {hook!r}; it holds {', '.join(info['hooks'])}")
    return np.load(folder / f"{hook}.npy", mmap_mode="r")
