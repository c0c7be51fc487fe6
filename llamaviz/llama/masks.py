"""The one attention-mask builder: causal + padding + sliding window + cache offset.

The model, the terminal printout and the web app all draw their masks from `build_mask`;
`AttentionMask` is the recipe the model hands to attention (and a lazy cache keeps).
"""

from __future__ import annotations

import torch


def build_mask(
    query_length: int,
    key_length: int | None = None,
    past_length: int = 0,
    attention_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Which keys each query may attend to: bool [b, 1, p, k], True = attend.

    Query i sits at absolute position `past_length + i`; it sees key j when j <= past_length + i
    (causal), j is not padding (`attention_mask[b, j] == 1`), and, with a sliding window,
    past_length + i - j < sliding_window. `key_length` defaults to past_length + query_length;
    a static cache passes its capacity, and the unwritten tail is masked by the causal rule.
    Without `attention_mask` the batch dimension is 1 and broadcasts.
    """
    if query_length <= 0:
        raise ValueError(f"query_length must be positive, got {query_length}")
    if past_length < 0:
        raise ValueError(f"past_length must be >= 0, got {past_length}")
    key_length = past_length + query_length if key_length is None else key_length
    if key_length < past_length + query_length:
        raise ValueError(f"key_length ({key_length}) must cover past_length + query_length "
                         f"({past_length} + {query_length})")
    if attention_mask is not None:
        device = attention_mask.device
    query_pos = torch.arange(past_length, past_length + query_length, device=device)[:, None]  # [p, 1]
    key_pos = torch.arange(key_length, device=device)[None, :]  # [1, k]
    allowed = key_pos <= query_pos  # [p, k]
    if sliding_window is not None:
        allowed = allowed & (query_pos - key_pos < sliding_window)
    allowed = allowed[None, None]  # [1, 1, p, k]
    if attention_mask is not None:
        padding = _padding_columns(attention_mask, key_length)  # [b, k]
        allowed = allowed & padding[:, None, None, :]
    return allowed


def attend_somewhere(mask: torch.Tensor) -> torch.Tensor:
    """Let rows with no allowed key (padding queries) attend everywhere, as transformers does.

    A fully masked row would softmax to NaN, and a NaN value at a padded position would leak into
    valid rows through `0 * NaN`. The rows changed are padding; their outputs are never used.
    """
    return mask | ~mask.any(dim=-1, keepdim=True)


def _padding_columns(attention_mask: torch.Tensor, key_length: int) -> torch.Tensor:
    """[b, k] bool from a [b, n] 0/1 mask; a static cache's unwritten tail (n < k) counts as valid."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, key_positions], got shape {tuple(attention_mask.shape)}")
    valid = attention_mask.bool()
    width = valid.shape[1]
    if width > key_length:
        raise ValueError(f"attention_mask covers {width} positions but only {key_length} keys exist")
    if width < key_length:
        tail = valid.new_ones(valid.shape[0], key_length - width)
        valid = torch.cat([valid, tail], dim=1)
    return valid


class AttentionMask:
    """The recipe of one step's mask (padding, cache offset, window), built into tensors only on demand.

    Attention receives this object instead of a tensor: the fused path asks `for_sdpa()` (None when
    the mask is plain causal), the eager path asks `dense()` (built once per forward, shared by
    every layer), and lazy patterns ask `rows(start, stop)` for a window of queries. Kept by a
    cache, it costs the [b, n] padding mask and three ints: linear in T, never a [p, k] tensor.
    """

    def __init__(self, query_length: int, past_length: int = 0, attention_mask: torch.Tensor | None = None,
                 sliding_window: int | None = None, key_length: int | None = None, device=None):
        self.query_length, self.past_length, self.sliding_window = query_length, past_length, sliding_window
        self.key_length = past_length + query_length if key_length is None else key_length
        self.attention_mask = attention_mask  # [b, n] 0/1 or None
        self.device = attention_mask.device if attention_mask is not None else device
        self._check()
        self.is_plain = self._plain()  # decided once per forward, not once per layer
        self._dense: torch.Tensor | None = None

    def _check(self) -> None:
        if self.query_length <= 0 or self.past_length < 0:
            raise ValueError(f"a mask needs query_length > 0 and past_length >= 0, got {self.query_length} "
                             f"and {self.past_length}")
        if self.key_length < self.past_length + self.query_length:
            raise ValueError(f"key_length ({self.key_length}) must cover past_length + query_length "
                             f"({self.past_length} + {self.query_length})")
        if self.attention_mask is not None and (self.attention_mask.dim() != 2
                                                or self.attention_mask.shape[1] > self.key_length):
            raise ValueError(f"attention_mask must be [batch, key_positions <= {self.key_length}], got shape "
                             f"{tuple(self.attention_mask.shape)}")

    def __repr__(self) -> str:
        padded = None if self.attention_mask is None else tuple(self.attention_mask.shape)
        return (f"AttentionMask(queries={self.query_length}, keys={self.key_length}, past={self.past_length}, "
                f"padding={padded}, window={self.sliding_window})")

    def _plain(self) -> bool:
        """True when every key up to the query is visible: SDPA's is_causal (or one query seeing all)."""
        p, past, window = self.query_length, self.past_length, self.sliding_window
        no_padding = self.attention_mask is None or bool(self.attention_mask.all())
        return (no_padding and self.key_length == past + p and (window is None or past + p <= window)
                and (past == 0 or p == 1))

    def for_sdpa(self) -> torch.Tensor | None:
        """None for plain causal (the kernel's is_causal path), else the dense bool mask."""
        return None if self.is_plain else self.dense()

    def dense(self) -> torch.Tensor:
        """bool [b|1, 1, p, k], padding rows allowed everywhere; built at most once and kept."""
        if self._dense is None:
            self._dense = self.rows(0, self.query_length)
        return self._dense

    def visible_keys(self, stop: int) -> int:
        """Keys that queries before `stop` may see: past + stop for causal rows without padding, else all.

        (A padding row attends everywhere, see attend_somewhere, so a mask with padding keeps every key.)
        """
        if self.attention_mask is not None and not bool(self.attention_mask.all()):
            return self.key_length
        return min(self.key_length, self.past_length + stop)

    def rows(self, start: int, stop: int, key_stop: int | None = None) -> torch.Tensor:
        """bool [b|1, 1, stop - start, k] for queries start..stop-1 (keys cut at key_stop); not kept."""
        if not 0 <= start < stop <= self.query_length:
            raise ValueError(f"query window {start}:{stop} is outside the {self.query_length} queries "
                             f"(accepted: 0 <= start < stop <= {self.query_length})")
        mask = build_mask(stop - start, self.key_length, self.past_length + start, self.attention_mask,
                          self.sliding_window, self.device)
        return attend_somewhere(mask)[..., :key_stop]

    def to(self, device) -> "AttentionMask":
        """The same recipe on another device (the built tensor is not carried)."""
        padding = None if self.attention_mask is None else self.attention_mask.to(device)
        return AttentionMask(self.query_length, self.past_length, padding, self.sliding_window, self.key_length,
                             device)
