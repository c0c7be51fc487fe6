"""Matplotlib twins of the plotly figures, for static export (PNG, SVG, PDF).

They build bare `matplotlib.figure.Figure` objects (no pyplot state, any backend), drawn from
the same panels as the plotly figures; save them with `fig.savefig(path)`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from llamaviz.plots import panels, pooling
from llamaviz.plots.checks import check_name
from llamaviz.plots.panels import Alternatives, Head, Heatmap, Tensor


def _plain(text: str) -> str:
    """Text drawn as is: a "$" would otherwise switch matplotlib to mathtext."""
    return text.replace("$", r"\$") if mpl.rcParams["text.parse_math"] else text


def _font_size(count: int) -> float:
    """Tick label size that keeps `count` labels legible on a ~6 inch axis."""
    return max(4.0, min(9.0, 360 / max(count, 1)))


def _cell_color_is_dark(rgba: Sequence[float]) -> bool:
    """True when black text would be hard to read on this colour (relative luminance)."""
    red, green, blue = rgba[:3]
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue < 0.5


def _draw_text(ax: Axes, panel: Heatmap, image) -> None:
    """Each cell's text over the image, white on dark cells."""
    rows, cols = panel.values.shape
    colors = image.cmap(image.norm(np.ma.masked_invalid(panel.values)))   # [rows, cols, 4]
    size = min(9.0, _font_size(cols) * 1.2)
    for row in range(rows):
        for col in range(cols):
            text = panel.cell_text[row, col]
            if text:
                dark = not np.isnan(panel.values[row, col]) and _cell_color_is_dark(colors[row, col])
                ax.text(col, row, _plain(text), ha="center", va="center", fontsize=size,
                        color="white" if dark else "black", clip_on=True)


def _draw(ax: Axes, panel: Heatmap, ticks: bool = True):
    """Draw one panel on `ax`; returns the image for a colour bar."""
    values = np.ma.masked_invalid(panel.values)
    if panel.log_scale:
        values = np.ma.masked_less_equal(values, 0)
        norm = LogNorm(vmin=panel.zmin, vmax=panel.zmax, clip=True)
    else:
        norm = Normalize(vmin=panel.zmin, vmax=panel.zmax)
    image = ax.imshow(values, cmap=panel.colorscale, norm=norm, aspect="auto",
                      interpolation="nearest", origin="upper" if panel.top_down else "lower")
    ax.set_title(_plain(panel.title), fontsize=10)
    if ticks:
        ax.set_xticks(range(len(panel.x_labels)), [_plain(t) for t in panel.x_labels],
                      rotation=90, fontsize=_font_size(len(panel.x_labels)))
        ax.set_yticks(range(len(panel.y_labels)), [_plain(t) for t in panel.y_labels],
                      fontsize=_font_size(len(panel.y_labels)))
        ax.set_xlabel(panel.x_title)
        ax.set_ylabel(panel.y_title)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if panel.cell_text is not None:
        _draw_text(ax, panel, image)
    return image


def _single(panel: Heatmap, width: float = 7.0, height: float | None = None) -> Figure:
    """A figure of one panel with its colour bar."""
    rows = panel.values.shape[0]
    fig = Figure(figsize=(width, height or min(12.0, max(4.0, 0.22 * rows + 2))),
                 layout="constrained")
    ax = fig.add_subplot()
    image = _draw(ax, panel)
    fig.colorbar(image, ax=ax, label=panel.colorbar_title)
    return fig


def attention_heatmap_mpl(pattern: Tensor, tokens: Sequence[str], key_tokens: Sequence[str] | None = None,
                          *, head: Head = "mean", layer: int | None = None, drop_first: bool = False,
                          log_scale: bool = False) -> Figure:
    """Matplotlib twin of plots.attention_heatmap."""
    panel = panels.attention_heatmap_panel(pattern, tokens, key_tokens, head, layer, drop_first,
                                           log_scale)
    return _single(panel, width=min(12.0, max(5.0, 0.22 * panel.values.shape[1] + 3)))


def head_grid_mpl(pattern: Tensor, tokens: Sequence[str], key_tokens: Sequence[str] | None = None, *,
                  layer: int, drop_first: bool = False, log_scale: bool = False) -> Figure:
    """Matplotlib twin of plots.head_grid (tick labels left off the small multiples)."""
    return panel_grid_mpl(panels.head_grid_panels(pattern, tokens, key_tokens, layer, drop_first, log_scale), layer)


def panel_grid_mpl(grid: list[Heatmap], layer: int) -> Figure:
    """Matplotlib twin of plots.panel_grid: one layer's head panels (exact or pooled) as small multiples."""
    cols = math.ceil(math.sqrt(len(grid)))
    rows = math.ceil(len(grid) / cols)
    fig = Figure(figsize=(2.4 * cols + 1, 2.4 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, panel in zip(axes.flat, grid):
        image = _draw(ax, panel, ticks=False)
    for ax in axes.flat[len(grid):]:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes, label=grid[0].colorbar_title, shrink=0.8)
    fig.suptitle(f"L{layer}: all {len(grid)} heads")
    return fig


def pooled_attention_heatmap_mpl(pooled: pooling.Pooled, tokens: Sequence[str], *, title: str = "",
                                 log_scale: bool = False) -> Figure:
    """Matplotlib twin of plots.pooled_attention_heatmap (exact cells while the blocks are one position)."""
    panel = pooling.pooled_panel(pooled, tokens, title=title, log_scale=log_scale)
    return _single(panel, width=min(12.0, max(5.0, 0.22 * panel.values.shape[1] + 3)))


def head_overview_mpl(scores: Tensor, score_name: str) -> Figure:
    """Matplotlib twin of plots.head_overview."""
    panel = panels.head_overview_panel(scores, score_name)
    return _single(panel, width=min(12.0, max(4.0, 0.35 * panel.values.shape[1] + 3)))


def logit_lens_mpl(probs: Tensor, top_tokens: Sequence[Sequence[str]], tokens: Sequence[str],
                   layer_labels: Sequence[str] | None = None) -> Figure:
    """Matplotlib twin of plots.logit_lens."""
    panel = panels.logit_lens_panel(probs, top_tokens, tokens, layer_labels)
    rows, cols = panel.values.shape
    return _single(panel, width=min(20.0, max(6.0, 0.8 * cols + 2)),
                   height=min(16.0, max(4.0, 0.3 * rows + 2)))


def resid_norms_mpl(norms: Tensor, tokens: Sequence[str], layer_labels: Sequence[str] | None = None,
                    kind: Literal["heatmap", "line"] = "heatmap") -> Figure:
    """Matplotlib twin of plots.resid_norms."""
    check_name(kind, "kind", ["heatmap", "line"])
    panel = panels.resid_norms_panel(norms, tokens, layer_labels)
    if kind == "heatmap":
        return _single(panel)
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for label, column in zip(panel.x_labels, panel.values.T):
        ax.plot(range(len(column)), column, marker=".", label=_plain(label))
    ax.set_xticks(range(len(panel.y_labels)), panel.y_labels, rotation=90,
                  fontsize=_font_size(len(panel.y_labels)))
    ax.set(title=panel.title, xlabel="layer", ylabel="L2 norm")
    ax.legend(fontsize=6, ncols=max(1, len(panel.x_labels) // 12), loc="upper left")
    return fig


def token_logprobs_mpl(tokens: Sequence[str], logprobs: Tensor, alternatives: Alternatives | None = None,
                       *, tokens_per_row: int = 16) -> Figure:
    """Matplotlib twin of plots.token_logprobs (no hover: the alternatives are not drawn)."""
    panel = panels.token_grid_panel(tokens, logprobs, alternatives, tokens_per_row)
    rows, cols = panel.values.shape
    fig = Figure(figsize=(max(6.0, 0.75 * cols), 0.45 * rows + 1.2), layout="constrained")
    ax = fig.add_subplot()
    image = _draw(ax, panel, ticks=False)
    ax.set_frame_on(False)
    fig.colorbar(image, ax=ax, label=panel.colorbar_title)
    return fig
