"""The attention tab at every length, on one path: heatmap, head grid, zoomed window, text shading.

Each view max-pools the pattern to what the plot can show (llamaviz.plots.pooling): the pooling
factor is 1, so every cell exact, up to ATTENTION_CELLS positions (GRID_CELLS per head in the grid)
and grows above it (a sharp attention to one far token stays visible). drop_first and log_scale
apply at every factor. A query/key window shows exact cells, and the text view shades the text by
how much one token attends to every earlier token (or is attended by every later one). Patterns
may be lazy: each view computes only the head and rows it shows. Results are memoised on the run.
"""

from __future__ import annotations

import dataclasses
import html

import plotly.graph_objects as go
import torch

from llamaviz import plots
from llamaviz.llama.lazy_patterns import pattern_rows
from llamaviz.plots import panels, pooling
from llamaviz.plots.tokens import display_token

from llamaviz.app import payload
from llamaviz.app.state import Run

ATTENTION_CELLS = 160  # positions per side the heatmap shows cell by cell; longer runs are pooled
GRID_CELLS = 48  # per side of each head's panel in the head grid
WINDOW_CELLS = 512 * 512  # exact cells a zoomed window may hold
DIRECTIONS = ("attends to", "attended by")


def reader(run: Run, layer: int, head) -> pooling.RowReader:
    return pooling.pattern_reader(run.activations(), layer, head)


def _title(layer: int, head) -> str:
    return f"L{layer} " + ("mean of heads" if head == "mean" else f"H{head}")


def pooled(run: Run, layer: int, head, cells: int, drop_first: bool = False) -> pooling.Pooled:
    """One head's (or the mean's) pattern over the run's positions, pooled to at most `cells` blocks per side."""
    return pooling.pooled_pattern(run.activations(), layer, head, len(run.cached_tokens), cells,
                                  drop_first=drop_first)


def heatmap_figure(run: Run, layer: int, head, drop_first: bool = False, log_scale: bool = False,
                   static: bool = False):
    """The heatmap of one head or the mean of the layer (matplotlib when `static`)."""
    grid = pooled(run, layer, head, ATTENTION_CELLS, drop_first)
    if static:
        return plots.pooled_attention_heatmap_mpl(grid, run.cached_tokens, title=_title(layer, head),
                                                  log_scale=log_scale)
    return payload.float32_traces(plots.pooled_attention_heatmap(grid, run.cached_tokens, title=_title(layer, head),
                                                                 log_scale=log_scale))


def grid_figure(run: Run, layer: int, drop_first: bool = False, log_scale: bool = False, static: bool = False):
    """Every head of a layer, each pooled to GRID_CELLS blocks per side, on one colour axis."""
    heads = range(run.entry.config.num_attention_heads)
    grids = [pooled(run, layer, head, GRID_CELLS, drop_first) for head in heads]
    if log_scale:  # one floor for every panel: they share the colour axis
        floor = min(panels.log_floor(grid.values) for grid in grids)
    shown = [pooling.pooled_panel(grid, run.cached_tokens, title=f"L{layer} H{head}", log_scale=log_scale)
             for head, grid in zip(heads, grids)]
    if log_scale:
        shown = [dataclasses.replace(panel, zmin=floor) for panel in shown]
    if static:
        return plots.panel_grid_mpl(shown, layer)
    return payload.float32_traces(plots.panel_grid(shown, layer))


def check_window(run: Run, queries, keys) -> tuple[tuple[int, int], tuple[int, int]]:
    """(q0, q1), (k0, k1) from the page's boxes (inclusive ends, as typed); ValueError naming the range."""
    n = len(run.cached_tokens)
    (q0, q1), (k0, k1) = [(int(a), int(b) + 1) for a, b in (queries, keys)]
    if not (0 <= q0 < q1 <= n and 0 <= k0 < k1 <= n):
        raise ValueError(f"the window queries {q0}–{q1 - 1}, keys {k0}–{k1 - 1} is outside the {n} positions "
                         f"(accepted: 0 <= first <= last <= {n - 1})")
    if (q1 - q0) * (k1 - k0) > WINDOW_CELLS:
        raise ValueError(f"the window has {(q1 - q0) * (k1 - k0):,} cells; zoom to at most 512 x 512 exact cells")
    return (q0, q1), (k0, k1)


def window_figure(run: Run, layer: int, head, queries, keys) -> go.Figure:
    """Exact cells of a query/key window with token labels at their true positions."""
    q, k = check_window(run, queries, keys)
    return plots.attention_window(reader(run, layer, head), run.cached_tokens, q, k, title=_title(layer, head))


def text_weights(run: Run, layer: int, head, position: int, direction: str) -> torch.Tensor:
    """[T] weights: row `position` (what it attends to) or column `position` (who attends to it)."""
    cache, n = run.activations(), len(run.cached_tokens)
    if direction == "attends to":
        row = pattern_rows(cache, layer, position, position + 1, None if head == "mean" else head)[0]
        row = row.float().mean(0) if head == "mean" else row  # [1, k']
        weights = torch.zeros(n)
        weights[:row.shape[-1]] = row[0, :n].cpu()
        return weights
    column = torch.zeros(n)
    band = pooling.BAND_ROWS
    for start in range(position, n, band):  # queries before `position` cannot see it
        stop = min(n, start + band)
        rows = reader(run, layer, head)(start, stop)  # [c, k']
        column[start:stop] = rows[:, position].float().cpu()
    return column


def text_view_html(run: Run, layer: int, head, position, direction: str = "attends to") -> str:
    """The text with each token shaded by its weight to/from `position` (outlined); scrollable."""
    n = len(run.cached_tokens)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}; got {direction!r}")
    if position is None or not 0 <= int(position) < n:
        raise ValueError(f"the token position must be in 0..{n - 1}; got {position!r}")
    position = int(position)
    weights = text_weights(run, layer, head, position, direction)
    top = float(weights.max()) or 1.0
    spans = []
    for index, (token, weight) in enumerate(zip(run.cached_tokens, weights.tolist())):
        text = html.escape(display_token(token).replace("␣", " ")).replace("⏎", "⏎<br>")
        alpha = weight / top
        mark = ' class="lv-picked"' if index == position else ""
        spans.append(f'<span data-pos="{index}"{mark} title="{index}: weight {weight:.4f}" '
                     f'style="background: rgba(67, 56, 202, {alpha:.3f}); color: {"#fff" if alpha > 0.55 else "inherit"}">'
                     f"{text}</span>")
    what = "attends to" if direction == "attends to" else "is attended by"
    caption = (f"{_title(layer, head)}: what token {position} {what}; darker = more weight "
               f"(the largest, {top:.3f}, is darkest). Click a token to pick it.")
    return (f'<div class="lv-text-view"><p>{html.escape(caption)}</p>'
            f'<div style="max-height: 420px; overflow-y: auto; line-height: 1.7; white-space: pre-wrap">'
            f'{"".join(spans)}</div></div>')
