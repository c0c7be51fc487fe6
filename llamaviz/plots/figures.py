"""Plotly figures: pure functions of tensors + token strings. Every token string is escaped
before it reaches the figure, since plotly renders a subset of HTML in text and hover."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from llamaviz.plots import panels, pooling
from llamaviz.plots.checks import check_name
from llamaviz.plots.panels import Alternatives, Head, Heatmap, Tensor
from llamaviz.plots.tokens import escape_all, escape_html

TEMPLATE = "plotly_white"   # no grey background behind blank (NaN) cells
ATTENTION_HOVER = "query %{y}<br>key %{x}<br>weight %{customdata:.4f}<extra></extra>"


def _z(panel: Heatmap) -> np.ndarray:
    """Values as coloured: log10 of the weights for a log scale (zeros left blank)."""
    if not panel.log_scale:
        return panel.values
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(panel.values > 0, np.log10(np.maximum(panel.values, panel.zmin)), np.nan)


def _colorbar(panel: Heatmap) -> dict:
    """Colour bar of a panel; a log scale gets ticks at whole decades labelled 1e-k."""
    bar = {"title": {"text": escape_html(panel.colorbar_title) + (" (log)" if panel.log_scale else "")}}
    if panel.log_scale:
        decades = list(range(math.floor(math.log10(panel.zmin)), 1))
        bar |= {"tickvals": decades, "ticktext": [f"1e{d}" if d else "1" for d in decades]}
    return bar


def _range(panel: Heatmap) -> tuple[float, float]:
    """Colour range in the coloured units (log10 for a log scale)."""
    if panel.log_scale:
        return math.log10(panel.zmin), math.log10(panel.zmax)
    return panel.zmin, panel.zmax


def _heatmap_trace(panel: Heatmap, **style) -> go.Heatmap:
    """One plotly heatmap of a panel; `style` adds hover, customdata or a shared colour axis."""
    zmin, zmax = _range(panel)
    trace = go.Heatmap(z=_z(panel), x=escape_all(panel.x_labels), y=escape_all(panel.y_labels),
                       colorscale=panel.colorscale, zmin=zmin, zmax=zmax,
                       colorbar=_colorbar(panel), **style)
    if panel.cell_text is not None:
        trace.update(text=[escape_all(row) for row in panel.cell_text], texttemplate="%{text}")
    return trace


def _hover(panel: Heatmap) -> list[list[str]]:
    """Each cell's hover lines, escaped and joined with <br> -> [rows][cols]."""
    return [["<br>".join(escape_all(lines)) for lines in row] for row in panel.cell_hover]


def _axes(fig: go.Figure, panel: Heatmap, ticks: bool = True) -> go.Figure:
    """Categorical axes (titled when `ticks`), first row on top when the panel says so."""
    fig.update_xaxes(type="category", title_text=panel.x_title if ticks else "", tickangle=-60,
                     showticklabels=ticks, showgrid=False)
    fig.update_yaxes(type="category", title_text=panel.y_title if ticks else "", showgrid=False,
                     autorange="reversed" if panel.top_down else True, showticklabels=ticks)
    return fig


def _single(panel: Heatmap, trace: go.Heatmap, cell: int = 18) -> go.Figure:
    """A figure of one heatmap sized to its cells."""
    rows = panel.values.shape[0]
    fig = go.Figure(trace)
    fig.update_layout(title={"text": escape_html(panel.title)}, template=TEMPLATE,
                      height=min(1100, max(450, cell * rows + 320)), margin={"l": 10, "r": 10})
    return _axes(fig, panel)


def attention_heatmap(pattern: Tensor, tokens: Sequence[str], key_tokens: Sequence[str] | None = None,
                      *, head: Head = "mean", layer: int | None = None, drop_first: bool = False,
                      log_scale: bool = False) -> go.Figure:
    """Attention of one head (head=int) or the layer mean (head="mean") of pattern [h, p, k] or [p, k]."""
    panel = panels.attention_heatmap_panel(pattern, tokens, key_tokens, head, layer, drop_first,
                                           log_scale)
    return _single(panel, _heatmap_trace(panel, customdata=panel.values,
                                         hovertemplate=ATTENTION_HOVER))


POOLED_HOVER = "query block %{y}<br>key block %{x}<br>max weight %{customdata:.4f}<extra></extra>"


def pooled_attention_heatmap(pooled: pooling.Pooled, tokens: Sequence[str], key_tokens: Sequence[str] | None = None,
                             *, title: str = "", log_scale: bool = False) -> go.Figure:
    """A pattern at any length: exact cells while the blocks are one position, else each cell the
    largest weight of its block, block ranges on hover."""
    panel = pooling.pooled_panel(pooled, tokens, key_tokens, title, log_scale)
    if pooled.block == 1:
        return _single(panel, _heatmap_trace(panel, customdata=panel.values, hovertemplate=ATTENTION_HOVER))
    return _single(panel, _heatmap_trace(panel, customdata=panel.values, hovertemplate=POOLED_HOVER), cell=2)


def attention_window(read_rows: pooling.RowReader, tokens: Sequence[str], queries: tuple[int, int],
                     keys: tuple[int, int], *, title: str = "") -> go.Figure:
    """Exact cells of a window of a long pattern, labelled with the tokens at their true positions."""
    panel = pooling.window_panel(read_rows, tokens, queries, keys, title)
    return _single(panel, _heatmap_trace(panel, customdata=panel.values, hovertemplate=ATTENTION_HOVER))


def _grid_shape(count: int) -> tuple[int, int]:
    """Rows and columns of a near-square grid of `count` small multiples."""
    cols = math.ceil(math.sqrt(count))
    return math.ceil(count / cols), cols


def head_grid(pattern: Tensor, tokens: Sequence[str], key_tokens: Sequence[str] | None = None, *,
              layer: int, drop_first: bool = False, log_scale: bool = False) -> go.Figure:
    """Every head of one layer's pattern [h, p, k] as small multiples titled "L{layer} H{head}".

    Each cell's customdata is [layer, head, weight] and each trace's meta {"layer", "head"},
    so a click maps back to its head."""
    grid = panels.head_grid_panels(pattern, tokens, key_tokens, layer, drop_first, log_scale)
    return panel_grid(grid, layer)


def panel_grid(grid: list[Heatmap], layer: int) -> go.Figure:
    """One layer's head panels (exact, windowed or pooled) as small multiples on one colour axis."""
    rows, cols = _grid_shape(len(grid))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[p.title for p in grid],
                        horizontal_spacing=0.02, vertical_spacing=0.06 / max(1, rows / 3))
    for head, panel in enumerate(grid):
        ids = np.broadcast_to([float(layer), float(head)], (*panel.values.shape, 2))
        customdata = np.concatenate([ids, panel.values[..., None]], axis=-1)   # [p, k, 3]
        fig.add_trace(_heatmap_trace(
            panel, customdata=customdata, coloraxis="coloraxis", name=panel.title,
            meta={"layer": int(layer), "head": head},
            hovertemplate=f"{escape_html(panel.title)}<br>{panel.y_title} %{{y}}<br>{panel.x_title} %{{x}}"
                          f"<br>{panel.colorbar_title} %{{customdata[2]:.4f}}<extra></extra>"),
            row=head // cols + 1, col=head % cols + 1)
    zmin, zmax = _range(grid[0])
    fig.update_layout(coloraxis={"colorscale": grid[0].colorscale, "cmin": zmin, "cmax": zmax,
                                 "colorbar": _colorbar(grid[0])},
                      height=max(400, 230 * rows), margin={"l": 10, "r": 10, "t": 80},
                      template=TEMPLATE,
                      title={"text": f"L{layer}: all {len(grid)} heads"})
    return _axes(fig, grid[0], ticks=False)


def head_overview(scores: Tensor, score_name: str) -> go.Figure:
    """One cell per head coloured by scores [layers, heads]; customdata [layer, head] per cell."""
    panel = panels.head_overview_panel(scores, score_name)
    layers, heads = panel.values.shape
    ids = np.stack(np.meshgrid(np.arange(layers), np.arange(heads), indexing="ij"), axis=-1)
    name = escape_html(score_name)
    trace = _heatmap_trace(panel, customdata=ids, xgap=1, ygap=1,
                           hovertemplate=f"L%{{customdata[0]}} H%{{customdata[1]}}<br>"
                                         f"{name}: %{{z:.3f}}<extra></extra>")
    fig = _single(panel, trace, cell=16)
    fig.update_xaxes(tickangle=0)
    return fig


def logit_lens(probs: Tensor, top_tokens: Sequence[Sequence[str]], tokens: Sequence[str],
               layer_labels: Sequence[str] | None = None) -> go.Figure:
    """Layers x positions: cell text each layer's top token, colour its probability, last layer on top."""
    panel = panels.logit_lens_panel(probs, top_tokens, tokens, layer_labels)
    trace = _heatmap_trace(panel, textfont={"size": 9}, customdata=_hover(panel), hovertemplate=(
        "%{y}<br>position %{x}<br>%{customdata}<br>p = %{z:.4f}<extra></extra>"))
    return _single(panel, trace, cell=22)


def resid_norms(norms: Tensor, tokens: Sequence[str], layer_labels: Sequence[str] | None = None,
                kind: Literal["heatmap", "line"] = "heatmap") -> go.Figure:
    """Residual-stream norms [layers+1, p] as a heatmap, or one line per position over layers."""
    check_name(kind, "kind", ["heatmap", "line"])
    panel = panels.resid_norms_panel(norms, tokens, layer_labels)
    if kind == "heatmap":
        return _single(panel, _heatmap_trace(panel, hovertemplate=(
            "%{y}<br>position %{x}<br>norm %{z:.3f}<extra></extra>")))
    fig = go.Figure([go.Scatter(x=escape_all(panel.y_labels), y=column, mode="lines+markers",
                                name=label, hovertemplate=f"{label}<br>%{{x}}<br>norm %{{y:.3f}}"
                                                          "<extra></extra>")
                     for label, column in zip(escape_all(panel.x_labels), panel.values.T)])
    fig.update_layout(title={"text": panel.title}, xaxis_title="layer", yaxis_title="L2 norm",
                      height=450, template=TEMPLATE)
    return fig


def token_logprobs(tokens: Sequence[str], logprobs: Tensor, alternatives: Alternatives | None = None,
                   *, tokens_per_row: int = 16) -> go.Figure:
    """Tokens [p] coloured by log-probability [p] (NaN = none), top alternatives on hover."""
    panel = panels.token_grid_panel(tokens, logprobs, alternatives, tokens_per_row)
    trace = _heatmap_trace(panel, customdata=_hover(panel), hovertemplate="%{customdata}<extra></extra>",
                           hoverongaps=False, xgap=2, ygap=2, textfont={"size": 12})
    fig = go.Figure(trace)
    rows = panel.values.shape[0]
    fig.update_layout(title={"text": panel.title}, height=max(170, 90 + 40 * rows), template=TEMPLATE,
                      margin={"l": 10, "r": 10, "t": 50, "b": 10})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    return fig
