"""What a load is asked for: dtype and device from their accepted spellings, and the loading progress bar.

dtype=None follows transformers 5, whose from_pretrained default is dtype="auto": the checkpoint's
own dtype (config.json's torch_dtype/dtype, else its first floating tensor's dtype).
"""

from __future__ import annotations

import sys
import time

import torch

from llamaviz.checkpoints.base import Checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "bf16": "bfloat16", "half": "float16", "fp16": "float16"}
DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_dtype(dtype=None, checkpoint: Checkpoint | None = None) -> torch.dtype:
    """float32 | bfloat16 | float16 from a torch dtype or its name; None or "auto" -> the checkpoint's own dtype."""
    if dtype is None or dtype == "auto":
        own = checkpoint.source_dtype if checkpoint is not None else torch.float32
        return own if own in DTYPES.values() else torch.float32
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        name = _DTYPE_ALIASES.get(name, name)
        if name in DTYPES:
            return DTYPES[name]
    elif isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise ValueError(f"dtype {dtype!r} is not supported; accepted: torch.float32, torch.bfloat16, torch.float16, "
                     "their names ('float32', 'bfloat16', 'float16'), or None/'auto' for the checkpoint's own dtype")


def resolve_device(device=None) -> torch.device:
    """torch.device from "cpu" | "cuda" | "cuda:N" | "mps" | "auto" (cuda, mps, cpu) | int N (cuda:N) | None (cpu)."""
    if device is None:
        return torch.device("cpu")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        resolved = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in DEVICE_TYPES:
        raise ValueError(f"device {device!r} is not supported; accepted: 'cpu', 'cuda', 'cuda:N', 'mps', 'auto', "
                         "an int N (cuda:N) or None (cpu)")
    _check_available(resolved)
    return resolved


def _check_available(device: torch.device) -> None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available; use 'cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} requested but only {torch.cuda.device_count()} CUDA "
                             "device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but MPS is not available; use 'cpu' or 'auto'")


class ProgressBar:
    """A one-line progress bar on stderr: `Loading x.gguf [#####.....] 52% 51/98 MB`."""

    def __init__(self, total: int, label: str, enabled: bool = True, width: int = 30, stream=None, callback=None):
        self.total, self.label, self.enabled, self.width = max(total, 1), label, enabled, width
        self.callback = callback  # fn(fraction, text), told of every update
        self.stream = stream or sys.stderr
        self.done, self._last_draw = 0, 0.0

    def update(self, amount: int) -> None:
        self.done += amount
        if self.callback is not None:
            self.callback(min(self.done / self.total, 1.0),
                          f"{self.label}: {self.done >> 20}/{self.total >> 20} MB")
        now = time.monotonic()
        if self.enabled and (now - self._last_draw > 0.1 or self.done >= self.total):
            self._last_draw = now
            filled = self.width * min(self.done, self.total) // self.total
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
                              f"{100 * self.done // self.total:3d}% {self.done >> 20}/{self.total >> 20} MB")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
