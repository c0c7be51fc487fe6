"""The one attention-mask builder: causal + padding + sliding window + cache offset.

The model, the terminal printout and the web app all draw their masks from `build_mask`.
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
