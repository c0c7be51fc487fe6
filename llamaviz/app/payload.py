"""Figures as small as the page needs: float32 cells, no duplicated per-cell hover data, and large
attention grids max-pooled to what the plot can show.

plotly sends numpy arrays as typed arrays (base64), so a float64 cell costs ~11 characters of JSON and
a float32 one ~5. A head grid of 9 heads at 431 positions with [layer, head, weight] customdata per
cell was 75 MB per layer move; pooled to 48 x 48 blocks per panel with float32 z it is ~0.2 MB.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import plotly.graph_objects as go

ATTENTION_CELLS = 160  # positions per side the single heatmap shows cell by cell; longer runs are pooled
GRID_CELLS = 48  # per side of each small panel of the head grid
_CUSTOM = re.compile(r"%\{customdata(?:\[\d+\])?")


def pooled_size(count: int, limit: int) -> tuple[int, int]:
    """(block, blocks): positions per block and the number of blocks when `count` is shown in ≤ `limit`."""
    block = max(1, math.ceil(count / limit))
    return block, math.ceil(count / block)


def max_pool(values: np.ndarray, block: int) -> np.ndarray:
    """The largest value in each block x block square of [p, k] (NaN only where a block is all NaN)."""
    if block == 1:
        return values
    rows, cols = values.shape
    padded = np.full((math.ceil(rows / block) * block, math.ceil(cols / block) * block), np.nan)
    padded[:rows, :cols] = values
    blocks = padded.reshape(padded.shape[0] // block, block, padded.shape[1] // block, block)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks (masked) stay NaN
        return np.nanmax(blocks, axis=(1, 3))


def pooled_labels(labels: list[str], block: int) -> list[str]:
    """Axis labels of blocks: the first position's label and how many follow it ("12: cat +2")."""
    if block == 1:
        return list(labels)
    out = []
    for start in range(0, len(labels), block):
        extra = min(block, len(labels) - start) - 1
        out.append(labels[start] + (f" +{extra}" if extra else ""))
    return out


def compact_heatmap(trace: go.Heatmap, limit: int, log_scale: bool) -> int:
    """Make one heatmap trace small in place (float32, pooled above `limit`); returns the block size."""
    z = np.asarray(trace.z, dtype=np.float64)  # [p, k]
    custom = None if trace.customdata is None else np.asarray(trace.customdata, dtype=np.float64)
    weights = None if custom is None else (custom[..., -1] if custom.ndim == 3 else custom)  # [p, k]
    block, _ = pooled_size(max(z.shape), limit)
    hover = trace.hovertemplate or ""
    if weights is not None and log_scale:  # z is log10: hover reads the weight from customdata
        custom, hover = max_pool(weights, block).astype(np.float32), _CUSTOM.sub("%{customdata", hover)
    elif weights is not None:  # z is the weight itself: no second copy
        custom, hover = None, _CUSTOM.sub("%{z", hover)
    if block > 1:
        hover = hover.replace("weight", f"max weight over {block}x{block} positions", 1)
    _replace_z(trace, max_pool(z, block).astype(np.float32))
    trace.update(customdata=custom, hovertemplate=hover or None)
    if trace.x is not None:
        trace.update(x=pooled_labels(list(trace.x), block))
    if trace.y is not None:
        trace.update(y=pooled_labels(list(trace.y), block))
    return block


def compact_figure(fig: go.Figure, limit: int, log_scale: bool = False) -> go.Figure:
    """Every heatmap of `fig` made small; a pooled figure says so in its title."""
    blocks = [compact_heatmap(trace, limit, log_scale) for trace in fig.data if trace.type == "heatmap"]
    block = max(blocks, default=1)
    if block > 1:
        title = fig.layout.title.text or ""
        fig.update_layout(title={"text": f"{title} · {block}x{block} positions per cell (max)"})
    return fig


def float32_traces(fig: go.Figure) -> go.Figure:
    """z of every heatmap as float32 (half the bytes of float64; no pooling)."""
    for trace in fig.data:
        if trace.type == "heatmap" and trace.z is not None:
            _replace_z(trace, np.asarray(trace.z, dtype=np.float32))
    return fig


def _replace_z(trace: go.Heatmap, z: np.ndarray) -> None:
    """Set z to a new dtype: plotly skips an assignment whose values equal the old ones, dtype and all."""
    trace.z = None
    trace.z = z


def json_bytes(value) -> int:
    """Size of a figure as gr.Plot sends it (JSON), or of a string / table the page receives."""
    if isinstance(value, go.Figure):
        return len(value.to_json())
    if isinstance(value, str):
        return len(value)
    if hasattr(value, "memory_usage"):  # pandas DataFrame
        return int(value.memory_usage(deep=True).sum())
    if hasattr(value, "element_size"):  # torch tensor
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(json_bytes(v) for v in value) + 8 * len(value)
    return 64
