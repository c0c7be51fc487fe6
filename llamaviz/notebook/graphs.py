"""show_graph: a pruned attribution graph as a static figure, nodes by layer (y) and position (x), sized by influence."""

from __future__ import annotations

import plotly.graph_objects as go
import torch

from llamaviz.graphs import Graph, Pruned, prune


def node_places(graph: Graph) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(x position [n], y layer [n]: tokens at -1, logits at L, labels) of every node."""
    n_f, p, n = len(graph.features), graph.positions, graph.n
    x, y, labels = torch.zeros(n), torch.zeros(n), []
    for index in range(n):
        if index < n_f:
            layer, position, feature = graph.features[index].tolist()
            label = f"feature {layer}/{position}/{feature}"
        elif index < n_f + graph.layers * p:
            layer, position = divmod(index - n_f, p)
            label = f"error {layer}/{position}"
        elif index < n - len(graph.logit_tokens):
            layer, position = -1, index - n_f - graph.layers * p
            label = f"token {position} ({int(graph.ids[0, position])})"
        else:
            layer, position = graph.layers, p - 1
            label = f"logit {int(graph.logit_tokens[index - (n - len(graph.logit_tokens))])}"
        x[index], y[index] = position, layer
        labels.append(label)
    return x, y, labels


def show_graph(graph: Graph, pruned: Pruned | None = None, max_edges: int = 300) -> go.Figure:
    """The kept nodes (markers sized by influence, errors grey) and the strongest kept edges (blue +, red -)."""
    if max_edges < 0:
        raise ValueError(f"max_edges must be >= 0, got {max_edges}")
    pruned = pruned if pruned is not None else prune(graph)
    x, y, labels = node_places(graph)
    kept = pruned.nodes.nonzero().flatten()
    spread = torch.linspace(-0.3, 0.3, 7)[torch.arange(graph.n) % 7]  # features at one spot side by side
    x = x + spread * (torch.arange(len(x)) < len(graph.features))
    figure = go.Figure()
    targets, sources = pruned.edges.nonzero(as_tuple=True)
    weights = graph.adjacency[targets, sources]
    for rank in weights.abs().argsort(descending=True)[:max_edges].tolist():
        t, s = int(targets[rank]), int(sources[rank])
        figure.add_trace(go.Scatter(x=[float(x[s]), float(x[t])], y=[float(y[s]), float(y[t])], mode="lines",
                                    line={"width": 1, "color": "#3b6fd8" if weights[rank] > 0 else "#d8473b"},
                                    opacity=0.4, hoverinfo="skip", showlegend=False))
    influence = pruned.influence[kept].clamp(min=0)
    sizes = 6 + 24 * (influence / influence.max().clamp(min=1e-12)).sqrt()
    n_f = len(graph.features)
    colours = ["#4c78a8" if i < n_f else "#b0b0b0" if i < n_f + graph.layers * graph.positions else "#333333"
               for i in kept.tolist()]
    figure.add_trace(go.Scatter(x=x[kept].tolist(), y=y[kept].tolist(), mode="markers", name="nodes",
                                marker={"size": sizes.tolist(), "color": colours},
                                text=[labels[i] for i in kept.tolist()], hoverinfo="text"))
    figure.update_layout(xaxis_title="position", yaxis_title="layer (tokens -1, logits on top)", showlegend=False,
                         height=500, margin={"l": 40, "r": 10, "t": 30, "b": 40})
    return figure
