"""The attention tab at thousands of tokens: pooled overviews, zoomed windows and a text view.

Above LONG positions a T x T heatmap has more cells than the screen has pixels, so the heatmap
and the head grid are max-pooled (llamaviz.plots.pooling; a sharp attention to one far token
stays visible), a query/key window shows exact cells, and the text view shades the text itself
by how much one token attends to every earlier token (or is attended by every later one).
Patterns are lazy: each view computes only the head and rows it shows.
"""

from __future__ import annotations

import html

import plotly.graph_objects as go
import torch

from llamaviz import plots
from llamaviz.llama.lazy_patterns import pattern_rows
from llamaviz.plots import pooling
from llamaviz.plots.tokens import display_token

from llamaviz.app.state import Run

LONG = 512  # above this many positions the attention views are pooled
GRID_CELLS = 96  # blocks per side of each head's panel in a pooled head grid
DIRECTIONS = ("attends to", "attended by")


def is_long(run: Run) -> bool:
    return len(run.cached_tokens) > LONG


def reader(run: Run, layer: int, head) -> pooling.RowReader:
    return pooling.pattern_reader(run.activations(), layer, head)


def _title(layer: int, head) -> str:
    return f"L{layer} " + ("mean of heads" if head == "mean" else f"H{head}")


def overview_figure(run: Run, layer: int, head) -> go.Figure:
    """The whole pattern max-pooled to at most pooling.MAX_CELLS blocks per side; block ranges on hover."""
    n = len(run.cached_tokens)
    pooled = pooling.pooled_pattern(run.activations(), layer, head, n)
    return plots.pooled_attention_heatmap(pooled, run.cached_tokens, title=_title(layer, head))


def check_window(run: Run, queries, keys) -> tuple[tuple[int, int], tuple[int, int]]:
    """(q0, q1), (k0, k1) from the page's boxes (inclusive ends, as typed); ValueError naming the range."""
    n = len(run.cached_tokens)
    (q0, q1), (k0, k1) = [(int(a), int(b) + 1) for a, b in (queries, keys)]
    if not (0 <= q0 < q1 <= n and 0 <= k0 < k1 <= n):
        raise ValueError(f"the window queries {q0}–{q1 - 1}, keys {k0}–{k1 - 1} is outside the {n} positions "
                         f"(accepted: 0 <= first <= last <= {n - 1})")
    if (q1 - q0) * (k1 - k0) > 512 * 512:
        raise ValueError(f"the window has {(q1 - q0) * (k1 - k0):,} cells; zoom to at most 512 x 512 exact cells")
    return (q0, q1), (k0, k1)


def window_figure(run: Run, layer: int, head, queries, keys) -> go.Figure:
    """Exact cells of a query/key window with token labels at their true positions."""
    q, k = check_window(run, queries, keys)
    return plots.attention_window(reader(run, layer, head), run.cached_tokens, q, k, title=_title(layer, head))


def grid_figure(run: Run, layer: int) -> go.Figure:
    """Every head of a layer, each max-pooled to GRID_CELLS blocks per side."""
    n, tokens = len(run.cached_tokens), run.cached_tokens
    panels = [pooling.pooled_panel(pooling.pooled_pattern(run.activations(), layer, head, n, GRID_CELLS), tokens,
                                   title=f"L{layer} H{head}")
              for head in range(run.entry.config.num_attention_heads)]
    return plots.panel_grid(panels, layer)


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
