"""Long patterns made readable: max-pooled overviews and exact zoomed windows.

At thousands of tokens a T x T heatmap has more cells than pixels. The overview max-pools the
pattern into at most `cells` x `cells` blocks (a sharp attention to one far token stays visible,
where a mean would wash it out), reading the pattern one band of query rows at a time, so a lazy
cache never materialises the whole matrix. A window shows exact cells with token labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llamaviz.interpret import causal_scores

from llamaviz.plots.panels import Head, Heatmap, log_floor
from llamaviz.plots.tokens import display_token, position_labels, shorten

MAX_CELLS = 512  # an overview is at most this many blocks per side
BAND_ROWS = 1024  # query rows read at once while pooling (about 1024 x T floats per head)

RowReader = Callable[[int, int], torch.Tensor]  # (start, stop) -> weights [stop - start, k' <= k]


@dataclass(frozen=True)
class Pooled:
    """values [R, C]: the largest weight of each block; edges [R + 1] / [C + 1]: block boundaries.

    first_key: the position of column edge 0 (1 when the first key was dropped and rows renormalised).
    NaN marks a block with no weight at all (query 0 once its only key is dropped).
    """

    values: np.ndarray
    row_edges: np.ndarray
    col_edges: np.ndarray
    first_key: int = 0

    @property
    def block(self) -> int:
        """Positions per block side (1: every cell is exact)."""
        return int(self.row_edges[1] - self.row_edges[0])

    def block_of(self, query: int, key: int) -> tuple[int, int]:
        """(row block, column block) holding cell (query, key)."""
        return (int(np.searchsorted(self.row_edges, query, side="right")) - 1,
                int(np.searchsorted(self.col_edges, key, side="right")) - 1)


def block_edges(length: int, cells: int = MAX_CELLS) -> np.ndarray:
    """[n + 1] boundaries of n <= cells equal blocks over 0..length (the last may be shorter)."""
    if length < 1 or cells < 1:
        raise ValueError(f"block_edges needs length >= 1 and cells >= 1, got {length} and {cells}")
    size = math.ceil(length / cells)
    return np.append(np.arange(0, length, size), length)


def max_pool(read_rows: RowReader, queries: int, keys: int, cells: int = MAX_CELLS, log_weights: bool = False,
             first_key: int = 0) -> Pooled:
    """Max-pool a [queries, keys] pattern read band by band; weights >= 0, so missing keys count as 0.

    log_weights: the reader gives log weights (masked keys -inf); the maxima are exponentiated at the end.
    NaN rows (no weight at all) are left out of their block's maximum; an all-NaN block stays NaN.
    """
    row_edges, col_edges = block_edges(queries, cells), block_edges(keys, cells)
    row_size, col_size = int(row_edges[1] - row_edges[0]), int(col_edges[1] - col_edges[0])
    cols = len(col_edges) - 1
    band = max(row_size, BAND_ROWS // row_size * row_size)  # whole row blocks per read
    missing = -math.inf if log_weights else 0.0
    pooled = []
    for start in range(0, queries, band):
        stop = min(queries, start + band)
        rows = read_rows(start, stop).float()  # [c, k'], k' <= keys: the keys these queries may see
        if not log_weights:
            rows = rows.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        row_blocks, seen = math.ceil(rows.shape[0] / row_size), math.ceil(rows.shape[1] / col_size)
        if rows.shape != (row_blocks * row_size, seen * col_size):  # pad the last blocks with "no weight"
            padded = rows.new_full((row_blocks * row_size, seen * col_size), missing)
            padded[:rows.shape[0], :rows.shape[1]] = rows
            rows = padded
        per_key_block = rows.view(-1, seen, col_size).amax(dim=-1)  # [c', seen]: the contiguous axis first
        band_max = per_key_block.new_full((row_blocks, cols), missing)  # blocks of unseen keys hold no weight
        band_max[:, :seen] = per_key_block.view(row_blocks, row_size, seen).amax(dim=1)
        pooled.append(band_max)  # [rb, C]
    values = torch.cat(pooled)
    values = values.exp() if log_weights else values.masked_fill(values == -math.inf, math.nan)
    return Pooled(values.cpu().numpy().astype(np.float64), row_edges, col_edges, first_key)


def pooled_pattern(cache, layer: int, head: Head, length: int, cells: int = MAX_CELLS, batch: int = 0,
                   drop_first: bool = False) -> Pooled:
    """One head's (or the heads' mean) [length, length] pattern of a cache, max-pooled to at most `cells` blocks per side.

    Up to `cells` positions the blocks are single cells: the exact pattern. A head of a plain causal
    lazy layer is pooled in log space (max of s - lse, then exp: the same maxima, without a softmax
    pass over every cell); anything else pools the pattern's rows. drop_first: key 0 (the attention
    sink) left out and each row renormalised before pooling, as plots.attention_heatmap does.
    """
    if drop_first:
        if length < 2:
            raise ValueError("drop_first needs at least 2 key positions; the pattern has 1")
        rows = without_first_key(pattern_reader(cache, layer, head, batch))
        return max_pool(rows, length, length - 1, cells, first_key=1)
    lazy = cache.lazy
    if head != "mean" and lazy is not None and causal_scores.applies(lazy, layer) \
            and lazy.pieces[layer].queries == length:
        return max_pool(log_weight_reader(lazy, layer, head, batch), length, length, cells, log_weights=True)
    return max_pool(pattern_reader(cache, layer, head, batch), length, length, cells)


def log_weight_reader(lazy, layer: int, head: int, batch: int = 0) -> RowReader:
    """Rows of log weights s - lse [c, stop] (keys after the query -inf) of one head of a plain causal lazy layer."""
    piece = lazy.pieces[layer]
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < piece.heads:
        raise IndexError(f"head {head!r} is out of range; accepted: 0..{piece.heads - 1}")
    group = head // (piece.heads // piece.kv_heads)
    q = piece.rot_q(0, piece.queries, slice(head, head + 1))[batch:batch + 1].transpose(1, 2).float()  # [1, 1, p, d]
    k = piece.rot_k(None, slice(group, group + 1))[batch:batch + 1].transpose(1, 2).float()  # [1, 1, p, d]
    lazy.computed_heads += 1
    q, k = q[0, 0], k[0, 0]  # [p, d]

    def read(start: int, stop: int) -> torch.Tensor:
        with torch.no_grad():  # a band holds every key its queries see, so its own log-sum-exp is exact
            rows = torch.matmul(q[start:stop], k[:stop].T).mul_(lazy.scale)  # [c, stop]
            later = torch.ones(stop - start, stop - start, dtype=torch.bool, device=rows.device).triu_(1)
            rows[:, start:].masked_fill_(later, -math.inf)
            return rows.sub_(rows.logsumexp(-1, keepdim=True))

    return read


def pattern_reader(cache, layer: int, head: Head, batch: int = 0) -> RowReader:
    """Rows of one head (or the mean of the layer's heads) of a cache's pattern, lazy or stored."""
    from llamaviz.llama.lazy_patterns import pattern_rows

    def read(start: int, stop: int) -> torch.Tensor:
        if head == "mean":
            return pattern_rows(cache, layer, start, stop)[batch].float().mean(0)  # [c, k']
        return pattern_rows(cache, layer, start, stop, head=head)[batch]  # [c, k']

    return read


def without_first_key(read_rows: RowReader) -> RowReader:
    """Rows [c, k' - 1] of a reader without key 0, renormalised; a row with no weight left is NaN."""

    def read(start: int, stop: int) -> torch.Tensor:
        rest = read_rows(start, stop).float()[:, 1:]  # [c, k' - 1]
        return rest / rest.sum(-1, keepdim=True)  # 0 / 0 = NaN: query 0 attends only to key 0

    return read


def block_label(edges: np.ndarray, index: int, tokens: Sequence[str], offset: int = 0) -> str:
    """ "a–b: first…last" for block `index` (positions a..b inclusive, edges counted from `offset`)."""
    start, stop = int(edges[index]) + offset, int(edges[index + 1]) - 1 + offset
    first = shorten(display_token(tokens[start]), 12)
    if start == stop:
        return f"{start}: {first}"
    return f"{start}–{stop}: {first}…{shorten(display_token(tokens[stop]), 12)}"


def pooled_panel(pooled: Pooled, tokens: Sequence[str], key_tokens: Sequence[str] | None = None,
                 title: str = "", log_scale: bool = False) -> Heatmap:
    """A pooled pattern as a Heatmap panel: "i: token" labels at one position per block (the exact
    view), else each label names its block's position range."""
    key_tokens = tokens if key_tokens is None else key_tokens
    rows, cols = pooled.values.shape
    if pooled.row_edges[-1] != len(tokens) or pooled.col_edges[-1] + pooled.first_key != len(key_tokens):
        raise ValueError(f"pooled pattern covers {pooled.row_edges[-1]} queries and "
                         f"{pooled.col_edges[-1] + pooled.first_key} keys; got {len(tokens)} tokens and "
                         f"{len(key_tokens)} key tokens")
    if pooled.first_key:
        title = f"{title} (first key dropped, rows renormalised)"
    exact = pooled.block == 1 and int(pooled.col_edges[1] - pooled.col_edges[0]) == 1
    if exact:
        x_labels, y_labels = position_labels(key_tokens)[pooled.first_key:], position_labels(tokens)
    else:
        title += f" (max over {pooled.block} x {int(pooled.col_edges[1] - pooled.col_edges[0])} blocks)"
        x_labels = [block_label(pooled.col_edges, i, key_tokens, pooled.first_key) for i in range(cols)]
        y_labels = [block_label(pooled.row_edges, i, tokens) for i in range(rows)]
    return Heatmap(values=pooled.values, x_labels=x_labels, y_labels=y_labels, title=title.strip(),
                   x_title="key" if exact else "key block", y_title="query" if exact else "query block",
                   colorbar_title="weight" if exact else "max weight", colorscale="Blues",
                   zmin=log_floor(pooled.values) if log_scale else 0.0, zmax=1.0, log_scale=log_scale)


def window_panel(read_rows: RowReader, tokens: Sequence[str], queries: tuple[int, int], keys: tuple[int, int],
                 title: str = "") -> Heatmap:
    """Exact weights of queries q0..q1-1 x keys k0..k1-1 with "i: token" labels at their true positions."""
    (q0, q1), (k0, k1) = queries, keys
    total = len(tokens)
    if not (0 <= q0 < q1 <= total and 0 <= k0 < k1 <= total):
        raise ValueError(f"window queries {q0}:{q1}, keys {k0}:{k1} is outside the sequence of {total} tokens "
                         f"(accepted: 0 <= start < stop <= {total})")
    rows = read_rows(q0, q1).float()  # [q, k']
    weights = rows.new_zeros(q1 - q0, k1 - k0)
    width = max(0, min(k1, rows.shape[1]) - k0)
    weights[:, :width] = rows[:, k0:k0 + width]
    label = lambda i: f"{i}: {shorten(display_token(tokens[i]), 32)}"  # noqa: E731
    return Heatmap(values=weights.cpu().numpy().astype(np.float64), x_labels=[label(i) for i in range(k0, k1)],
                   y_labels=[label(i) for i in range(q0, q1)], title=f"{title} queries {q0}–{q1 - 1}".strip(),
                   x_title="key", y_title="query", colorbar_title="weight", colorscale="Blues", zmin=0.0, zmax=1.0)
