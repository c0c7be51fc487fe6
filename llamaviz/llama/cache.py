"""Key/value caches. Keys and values are stored [b, g, T, d] per layer, after RoPE.

DynamicCache grows (by doubling, so a decode step writes in place instead of re-concatenating);
StaticCache is allocated once for prompt + new tokens, so every step has the same shapes
(what torch.compile needs).
"""

from __future__ import annotations

import torch


class DynamicCache:
    """Grows with the sequence; `update` returns views of the first `seq_length` positions."""

    def __init__(self, initial_capacity: int = 256):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []
        self.initial_capacity = initial_capacity

    def get_seq_length(self, layer: int = 0) -> int:
        return self.lengths[layer] if layer < len(self.lengths) else 0

    @property
    def key_length(self) -> int | None:
        """Keys the next step attends over beyond its own: None means exactly past + new."""
        return None

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key/value [b, g, p, d] of `layer`; return all of that layer's [b, g, T, d]."""
        if layer == len(self.keys):
            capacity = max(self.initial_capacity, key.shape[2])
            self.keys.append(key.new_empty(*key.shape[:2], capacity, key.shape[3]))
            self.values.append(value.new_empty(*value.shape[:2], capacity, value.shape[3]))
            self.lengths.append(0)
        start, end = self.lengths[layer], self.lengths[layer] + key.shape[2]
        if end > self.keys[layer].shape[2]:
            self._grow(layer, end)
        self.keys[layer][:, :, start:end] = key
        self.values[layer][:, :, start:end] = value
        self.lengths[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def _grow(self, layer: int, needed: int) -> None:
        capacity = max(needed, 2 * self.keys[layer].shape[2])
        for store in (self.keys, self.values):
            old = store[layer]
            store[layer] = old.new_empty(*old.shape[:2], capacity, old.shape[3])
            store[layer][:, :, :old.shape[2]] = old

    def reorder(self, keep: torch.Tensor) -> None:
        """Keep only the batch rows `keep` (e.g. finished sequences dropped)."""
        self.keys = [k[keep] for k in self.keys]
        self.values = [v[keep] for v in self.values]


class StaticCache:
    """Preallocated for `max_cache_len` positions; attention always spans all of them (masked)."""

    def __init__(self, num_layers: int, batch_size: int, kv_heads: int, head_dim: int, max_cache_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, kv_heads, max_cache_len, head_dim)  # [b, g, T, d]
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_cache_len = max_cache_len
        self.seq_length = 0

    def get_seq_length(self, layer: int = 0) -> int:
        return self.seq_length

    @property
    def key_length(self) -> int:
        return self.max_cache_len

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write key/value [b, g, p, d] at the current offset; return the whole [b, g, T, d] buffers."""
        start, end = self.seq_length, self.seq_length + key.shape[2]
        if end > self.max_cache_len:
            raise ValueError(f"static cache holds {self.max_cache_len} positions; writing {start}..{end} overflows it")
        self.keys[layer][:, :, start:end] = key
        self.values[layer][:, :, start:end] = value
        if layer == len(self.keys) - 1:
            self.seq_length = end
        return self.keys[layer], self.values[layer]
