"""Figures of the explanation views: direct logit attribution, patching maps, input attribution and
the information-flow graph. Pure functions of tensors + token strings (every token string escaped);
`dla_bars_mpl` and `patching_heatmap_mpl` are the matplotlib twins used for PNG export."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale, unlabel_rgb
from plotly.subplots import make_subplots

from llamaviz.plots.tokens import display_token, escape_all, escape_html, position_labels

TEMPLATE = "plotly_white"
DIVERGING = "RdBu"  # red = pushes the metric up, blue = down (reversed so positive is red)
FLOW_COLOURS = {"attn": "#4f46e5", "mlp": "#dc2626", "resid": "#9ca3af"}


def _array(values, what: str, dims: int) -> np.ndarray:
    """Values as a float numpy array with `dims` axes; ValueError naming `what` otherwise."""
    array = np.asarray(values.detach().float().cpu() if hasattr(values, "detach") else values, dtype=float)
    if array.ndim != dims:
        raise ValueError(f"{what} must have {dims} axes; got shape {array.shape}")
    return array


def _limit(array: np.ndarray) -> float:
    """A symmetric colour range around 0 (1 when all values are 0 or NaN)."""
    finite = np.abs(array[np.isfinite(array)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def dla_figure(labels: Sequence[str], components, heads, accumulated, accumulated_labels: Sequence[str],
               title: str) -> go.Figure:
    """Direct logit attribution: components [c] as bars, heads [L, h] as a heatmap, the accumulated residual [L+1]."""
    values = _array(components, "components", 1)
    head_values = _array(heads, "heads", 2)
    lens = _array(accumulated, "accumulated", 1)
    if len(labels) != values.size or len(accumulated_labels) != lens.size:
        raise ValueError(f"got {len(labels)} labels for {values.size} components and {len(accumulated_labels)} "
                         f"for {lens.size} accumulated values; they must match")
    figure = make_subplots(rows=3, cols=1, vertical_spacing=0.09, row_heights=[0.3, 0.45, 0.25], subplot_titles=(
        "embedding, each layer's attention and MLP", "each head (layer x head)", "accumulated residual stream"))
    figure.add_trace(go.Bar(x=escape_all(list(labels)), y=values, name="component",
                            marker_color=["#dc2626" if v >= 0 else "#2563eb" for v in values],
                            hovertemplate="%{x}: %{y:.5f}<extra></extra>"), row=1, col=1)
    limit = _limit(head_values)
    figure.add_trace(go.Heatmap(z=head_values, colorscale=DIVERGING, reversescale=True, zmin=-limit, zmax=limit,
                                colorbar={"title": {"text": "logit"}, "len": 0.45, "y": 0.45},
                                hovertemplate="L%{y} H%{x}: %{z:.5f}<extra></extra>"), row=2, col=1)
    figure.add_trace(go.Scatter(x=escape_all(list(accumulated_labels)), y=lens, mode="lines+markers",
                                name="accumulated", hovertemplate="%{x}: %{y:.5f}<extra></extra>"), row=3, col=1)
    figure.update_yaxes(title_text="layer", autorange="reversed", row=2, col=1)
    figure.update_xaxes(title_text="head", row=2, col=1)
    figure.update_layout(template=TEMPLATE, height=860, showlegend=False, title=escape_html(title),
                         margin={"l": 50, "r": 20, "t": 80, "b": 40})
    return figure


def patching_heatmap(maps: dict, tokens: Sequence[str], title: str) -> go.Figure:
    """Normalised patching metric of block sweeps {name: [L, p]} side by side, tokens on x."""
    if not maps:
        raise ValueError("patching_heatmap needs at least one map")
    arrays = {name: _array(values, name, 2) for name, values in maps.items()}
    labels = escape_all(position_labels(tokens))
    for name, array in arrays.items():
        if array.shape[1] != len(labels):
            raise ValueError(f"{name} has {array.shape[1]} positions but there are {len(labels)} tokens")
    limit = max(_limit(a) for a in arrays.values())
    figure = make_subplots(rows=1, cols=len(arrays), shared_yaxes=True, subplot_titles=list(arrays),
                           horizontal_spacing=0.03)
    for col, (name, array) in enumerate(arrays.items(), start=1):
        figure.add_trace(go.Heatmap(z=array, x=labels, colorscale=DIVERGING, reversescale=True, zmin=-limit,
                                    zmax=limit, showscale=col == len(arrays), name=name,
                                    hovertemplate=f"{name}<br>layer %{{y}}<br>%{{x}}<br>%{{z:.4f}}<extra></extra>"),
                         row=1, col=col)
    figure.update_yaxes(autorange="reversed")
    figure.update_yaxes(title_text="layer", row=1, col=1)
    figure.update_layout(template=TEMPLATE, height=520, title=escape_html(title), margin={"t": 80, "b": 120})
    return figure


def head_heatmap(values, title: str, colorbar: str = "normalised metric") -> go.Figure:
    """A layer x head map [L, h] on a diverging scale around 0 (patching per head, head DLA)."""
    array = _array(values, "values", 2)
    limit = _limit(array)
    figure = go.Figure(go.Heatmap(z=array, colorscale=DIVERGING, reversescale=True, zmin=-limit, zmax=limit,
                                  colorbar={"title": {"text": escape_html(colorbar)}},
                                  hovertemplate="L%{y} H%{x}: %{z:.4f}<extra></extra>"))
    figure.update_layout(template=TEMPLATE, height=520, title=escape_html(title), xaxis_title="head",
                         yaxis={"title": "layer", "autorange": "reversed"})
    return figure


def side_by_side(maps: dict, x_labels: Sequence[str], y_labels: Sequence[str], title: str) -> go.Figure:
    """Heatmaps [rows, cols] side by side (clean, corrupted, difference), the last on a scale around 0."""
    arrays = {name: _array(v, name, 2) for name, v in maps.items()}
    x, y = escape_all(list(x_labels)), escape_all(list(y_labels))
    figure = make_subplots(rows=1, cols=len(arrays), shared_yaxes=True, subplot_titles=list(arrays),
                           horizontal_spacing=0.03)
    for col, (name, array) in enumerate(arrays.items(), start=1):
        last = col == len(arrays)
        scale = {"colorscale": DIVERGING, "reversescale": True, "zmid": 0} if last else {"colorscale": "Viridis"}
        figure.add_trace(go.Heatmap(z=array, x=x, y=y, showscale=last, name=name, **scale,
                                    hovertemplate=f"{name}<br>%{{y}}<br>%{{x}}<br>%{{z:.4f}}<extra></extra>"),
                         row=1, col=col)
    figure.update_yaxes(autorange="reversed")
    figure.update_layout(template=TEMPLATE, height=460, title=escape_html(title), margin={"t": 80, "b": 120})
    return figure


def saliency_html(tokens: Sequence[str], scores, method: str, target: str) -> str:
    """Tokens [p] coloured by attribution scores [p] (red = toward the target, blue = against) as a <div>."""
    values = _array(scores, "scores", 1)
    if values.size != len(tokens):
        raise ValueError(f"got {values.size} scores for {len(tokens)} tokens")
    limit = _limit(values)
    spans = []
    for position, (token, value) in enumerate(zip(tokens, values)):
        share = 0.5 - 0.5 * value / limit if math.isfinite(value) else 0.5
        background = sample_colorscale(DIVERGING, [share])[0]
        red, green, blue = (c / 255 for c in unlabel_rgb(background))
        colour = "#ffffff" if 0.2126 * red + 0.7152 * green + 0.0722 * blue < 0.5 else "#111827"
        title = f"{position}: {display_token(token)}\n{method}: {value:.6g}"
        spans.append(f'<span class="llamaviz-token" data-score="{value:.6g}" title="{escape_html(title, quote=True)}" '
                     f'style="background:{background};color:{colour};padding:1px 2px;margin:1px;border-radius:3px;'
                     f'font-family:monospace;white-space:pre">{escape_html(display_token(token))}</span>')
    legend = (f'<div class="llamaviz-legend" style="font-size:smaller;color:#6b7280">{escape_html(method)} toward '
              f'{escape_html(display_token(target))}: red adds, blue removes (largest |score| {limit:.4g}); '
              f"hover a token for its value</div>")
    return f'<div class="llamaviz-saliency" style="line-height:1.9">{"".join(spans)}</div>{legend}'


def flow_figure(graph, tokens: Sequence[str], layers: int) -> go.Figure:
    """The information-flow graph: nodes at (position, layer), edges as lines as wide as their share.

    Each edge's midpoint is a marker carrying its index in graph.edges (customdata), so a click can say
    which edge was picked; nodes carry (layer, position).
    """
    labels = position_labels(tokens)
    figure = go.Figure()
    mids = {"x": [], "y": [], "index": [], "text": [], "colour": []}
    for index, edge in enumerate(graph.edges):
        x0, y0, x1, y1 = edge.source, edge.layer, edge.target, edge.layer + 1
        figure.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="skip", showlegend=False,
                                    line={"color": FLOW_COLOURS[edge.kind], "width": 1 + 8 * edge.share}))
        what = f"L{edge.layer} H{edge.head}" if edge.kind == "attn" else f"L{edge.layer} {edge.kind}"
        mids["x"].append((x0 + x1) / 2)
        mids["y"].append((y0 + y1) / 2)
        mids["index"].append(index)
        mids["colour"].append(FLOW_COLOURS[edge.kind])
        mids["text"].append(escape_html(f"{what}: {labels[x0]} → {labels[x1]}, share {edge.share:.3f}"))
    figure.add_trace(go.Scatter(x=mids["x"], y=mids["y"], mode="markers", name="edges", customdata=mids["index"],
                                marker={"size": 7, "color": mids["colour"], "symbol": "diamond"},
                                text=mids["text"], hovertemplate="%{text}<extra>edge</extra>"))
    nodes = graph.nodes
    figure.add_trace(go.Scatter(
        x=[p for _, p in nodes], y=[layer for layer, _ in nodes], mode="markers", name="nodes",
        customdata=[[layer, p] for layer, p in nodes], marker={"size": 10, "color": "#111827"},
        text=escape_all([f"{'final' if layer == layers else f'before L{layer}'} · {labels[p]}" for layer, p in nodes]),
        hovertemplate="%{text}<extra>node</extra>"))
    figure.update_layout(template=TEMPLATE, height=max(420, 18 * layers), showlegend=False,
                         title=escape_html(f"Information flow into {labels[graph.position]} "
                                           f"(edges with share ≥ {graph.threshold:g})"),
                         xaxis={"tickvals": list(range(len(labels))), "ticktext": escape_all(labels),
                                "title": "position"},
                         yaxis={"title": "layer (residual stream entering it)", "autorange": "reversed"})
    return figure


def dla_bars_mpl(labels: Sequence[str], components, title: str):
    """Matplotlib twin of dla_figure's bars (PNG export)."""
    import matplotlib.pyplot as plt

    values = _array(components, "components", 1)
    figure, axes = plt.subplots(figsize=(max(6, 0.18 * len(labels)), 3.5))
    axes.bar(range(values.size), values, color=["#dc2626" if v >= 0 else "#2563eb" for v in values])
    axes.set_xticks(range(values.size), [display_token(t) for t in labels], rotation=90, fontsize=6)
    axes.set_title(title)
    axes.set_ylabel("logit")
    figure.tight_layout()
    return figure


def heatmap_mpl(values, title: str, x_labels: Sequence[str] | None = None):
    """Matplotlib twin of a patching or head map [rows, cols] on a diverging scale (PNG export)."""
    import matplotlib.pyplot as plt

    array = _array(values, "values", 2)
    limit = _limit(array)
    figure, axes = plt.subplots(figsize=(max(5, 0.35 * array.shape[1]), 5))
    image = axes.imshow(array, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    if x_labels is not None:
        axes.set_xticks(range(len(x_labels)), position_labels(x_labels), rotation=90, fontsize=6)
    axes.set_ylabel("layer")
    axes.set_title(title)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    return figure
