"""The Graph tab's drawing: the pruned graph as an inline SVG (no script, nothing fetched), laid out by layer
(y, embeddings at the bottom, logits on top) and position (x); node size by influence, edge width by
|weight|, blue for positive and red for negative. Each node is a <g data-node="ID"> whose <title> is its
hover summary. Numbers are read from the graph and graphs.prune, never recomputed.
"""

from __future__ import annotations

import html
from pathlib import Path

import torch

from llamaviz.features import dashboards
from llamaviz.plots.tokens import display_token

from llamaviz.app.graph import Built, transcoder_set

MAX_EDGES = 400  # the strongest kept edges drawn (by |weight|); the caption says how many were kept
ROW, COLUMN, NODE_GAP, MARGIN = 22, 70, 13, 60
POSITIVE, NEGATIVE = "#2563eb", "#dc2626"
KIND_COLOUR = {"feature": "#f59e0b", "error": "#9ca3af", "token": "#10b981", "logit": "#8b5cf6"}


def kind(graph, index: int) -> str:
    n_f, p, n = len(graph.features), graph.positions, graph.n
    if index < n_f:
        return "feature"
    if index < n_f + graph.layers * p:
        return "error"
    return "token" if index < n - len(graph.logit_tokens) else "logit"


def node_id(graph, index: int) -> str:
    """circuit-tracer's node ids: layer_feature_position, layer_error_position, E_token_position, L+1_token_p-1."""
    n_f, p, n = len(graph.features), graph.positions, graph.n
    what = kind(graph, index)
    if what == "feature":
        layer, position, feature = graph.features[index].tolist()
        return f"{layer}_{feature}_{position}"
    if what == "error":
        layer, position = divmod(index - n_f, p)
        return f"{layer}_error_{position}"
    if what == "token":
        position = index - n_f - graph.layers * p
        return f"E_{int(graph.ids[0, position])}_{position}"
    return f"{graph.layers + 1}_{int(graph.logit_tokens[index - (n - len(graph.logit_tokens))])}_{p - 1}"


def index_of(graph, text: str) -> int:
    """The adjacency index of a node id; ValueError naming the accepted forms."""
    wanted = str(text or "").strip()
    for index in range(graph.n):
        if node_id(graph, index) == wanted:
            return index
    raise ValueError(f"no node {wanted!r} in this graph; accepted: the ids listed (layer_feature_position, "
                     "layer_error_position, E_token_position, or the logits' layers+1_token_position)")


def place(graph, index: int) -> tuple[int, int]:
    """(row, position) of a node: row 0 = embeddings, 1..L = layers, L+1 = logits."""
    n_f, p = len(graph.features), graph.positions
    what = kind(graph, index)
    if what == "feature":
        layer, position, _ = graph.features[index].tolist()
        return layer + 1, position
    if what == "error":
        layer, position = divmod(index - n_f, p)
        return layer + 1, position
    if what == "token":
        return 0, index - n_f - graph.layers * p
    return graph.layers + 1, p - 1


def shown_nodes(built: Built, pruned) -> list[int]:
    """The kept features, tokens and logits, and the error nodes at least as influential as the least kept feature."""
    graph, influence = built.graph, pruned.influence
    n_f = len(graph.features)
    kept = pruned.nodes.nonzero().flatten().tolist()
    floor = float(influence[:n_f][pruned.nodes[:n_f]].min()) if pruned.nodes[:n_f].any() else float("inf")
    return [i for i in kept if kind(graph, i) != "error" or float(influence[i]) >= floor]


def cells(graph, shown: list[int]) -> dict[tuple[int, int], list[int]]:
    """{(row, position): the shown nodes drawn there}."""
    found: dict[tuple[int, int], list[int]] = {}
    for index in shown:
        found.setdefault(place(graph, index), []).append(index)
    return found


def column_width(graph, found: dict) -> float:
    """One position's column: wide enough for its most crowded cell (the logits' row spreads on its own)."""
    crowded = [len(members) for (row, _), members in found.items() if row <= graph.layers]
    return max(COLUMN, NODE_GAP * (1 + max(crowded, default=1)))


def coordinates(graph, found: dict, cell: float) -> dict[int, tuple[float, float]]:
    """{node: (x, y)} in the drawing's pixels; a cell's nodes side by side around its centre, the logits
    leftwards from the last position in order of probability."""
    points = {}
    for (row, position), members in found.items():
        for slot, index in enumerate(members):
            offset = -slot * 1.5 * NODE_GAP if row > graph.layers else (slot - (len(members) - 1) / 2) * NODE_GAP
            points[index] = (MARGIN + position * cell + cell / 2 + offset, MARGIN / 2 + (graph.layers + 1 - row) * ROW)
    return points


def summaries(run, built: Built, shown: list[int], pruned) -> dict[int, str]:
    """Hover text per node: activation and influence, and for a feature its dashboard's density and promoted
    tokens (layer_{L}/dashboards.safetensors in the set's folder) or else its logit effects."""
    graph, tok = built.graph, run.entry.tokenizer
    word = lambda i: display_token(tok.decode([int(i)]))  # noqa: E731
    texts = {}
    for index in shown:
        row, position = place(graph, index)
        head = f"{node_id(graph, index)} at {position} {display_token(built.tokens[position])!r}"
        texts[index] = f"{kind(graph, index)} {head}; influence {float(pruned.influence[index]):.4f}"
    features = [i for i in shown if kind(graph, i) == "feature"]
    for layer in sorted({int(graph.features[i, 0]) for i in features}):
        here = [i for i in features if int(graph.features[i, 0]) == layer]
        board = _board(built.path, layer)
        if board is None:
            rows = built.graph.features[here, 2]
            tc = transcoder_set(built.path)[layer]
            effects = dashboards.logit_effects(run.entry.model, _Rows(tc.W_dec[rows]), 3)
            promoted = [effects["promoted_ids"][k].tolist() for k in range(len(here))]
            density = [None] * len(here)
        else:
            data = [board.feature(int(graph.features[i, 2])) for i in here]
            promoted = [d["promoted_ids"][:3].tolist() for d in data]
            density = [float(d["density"]) for d in data]
        for i, ids, d in zip(here, promoted, density):
            extra = "" if d is None else f"; density {d:.3%}"
            texts[i] += (f"; activation {float(graph.activations[i]):.3f}{extra}; promotes "
                         + ", ".join(word(t) for t in ids))
    for index in shown:
        if kind(graph, index) == "logit":
            rank = index - (graph.n - len(graph.logit_tokens))
            texts[index] += f"; {word(graph.logit_tokens[rank])} p={float(graph.logit_probs[rank]):.3f}"
    return texts


class _Rows:
    """Some decoder rows of a transcoder, shaped as dashboards.logit_effects reads a dictionary."""

    def __init__(self, rows: torch.Tensor):
        self.W_dec = rows

        class cfg:  # noqa: N801
            d_sae = rows.shape[0]
        self.cfg = cfg


def _board(path: str, layer: int):
    folder = Path(path) / f"layer_{layer}"
    try:
        return dashboards.DashboardFile(folder)
    except FileNotFoundError:
        return None


def svg(run, built: Built, pruned, pinned: list[int]) -> str:
    """The drawing of the pruned graph, pinned nodes outlined."""
    graph = built.graph
    shown = shown_nodes(built, pruned)
    found = cells(graph, shown)
    cell = column_width(graph, found)
    missing = [i for i in shown if i not in built.hover]
    built.hover.update(summaries(run, built, missing, pruned) if missing else {})
    points, texts = coordinates(graph, found, cell), built.hover
    width = MARGIN + graph.positions * cell + 20
    height = MARGIN / 2 + (graph.layers + 1) * ROW + 30
    parts = [_axes(built, cell, height)]
    parts += _edges(graph, pruned, points)
    top = float(pruned.influence[shown].max()) if shown else 1.0
    for index in shown:
        x, y = points[index]
        radius = 3 + 8 * (max(float(pruned.influence[index]), 0.0) / (top or 1.0)) ** 0.5
        outline = 'stroke="#111827" stroke-width="2.5"' if index in pinned else 'stroke="#ffffff" stroke-width="0.8"'
        shape = (f'<rect x="{x - radius:.1f}" y="{y - radius:.1f}" width="{2 * radius:.1f}" height="{2 * radius:.1f}" '
                 if kind(graph, index) in ("error", "token") else f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{radius:.1f}" ')
        parts.append(f'<g class="lv-graph-node" data-node="{node_id(graph, index)}" style="cursor:pointer">'
                     f"<title>{html.escape(texts[index])}</title>{shape}fill=\"{KIND_COLOUR[kind(graph, index)]}\" "
                     f"{outline}/></g>")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="lv-graph" width="100%" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" font-size="10" font-family="sans-serif">{"".join(parts)}</svg>')


def _axes(built: Built, cell: float, height: float) -> str:
    """Token labels along the bottom, layer names down the left."""
    graph, labels = built.graph, []
    for position, token in enumerate(built.tokens):
        x = MARGIN + position * cell + cell / 2
        labels.append(f'<text x="{x:.1f}" y="{height - 8:.1f}" text-anchor="middle">'
                      f"{html.escape(display_token(token)[:10])}</text>")
    for row, name in [(0, "emb"), *[(layer + 1, f"L{layer}") for layer in range(graph.layers)],
                      (graph.layers + 1, "logits")]:
        y = MARGIN / 2 + (graph.layers + 1 - row) * ROW
        labels.append(f'<text x="4" y="{y + 3:.1f}" fill="#6b7280">{name}</text>')
    return "".join(labels)


def _edges(graph, pruned, points: dict) -> list[str]:
    shown = torch.tensor(sorted(points), dtype=torch.long)
    if not len(shown):
        return []
    mask = pruned.edges[shown][:, shown]
    targets, sources = mask.nonzero(as_tuple=True)
    weights = graph.adjacency[shown[targets], shown[sources]]
    order = weights.abs().argsort(descending=True)[:MAX_EDGES]
    strongest = float(weights.abs().max()) if len(weights) else 1.0
    lines = []
    for k in order.flip(0).tolist():  # the strongest drawn last, on top
        target, source, weight = int(shown[targets[k]]), int(shown[sources[k]]), float(weights[k])
        (x1, y1), (x2, y2) = points[source], points[target]
        lines.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                     f'stroke="{POSITIVE if weight > 0 else NEGATIVE}" stroke-opacity="0.55" '
                     f'stroke-width="{0.4 + 3.6 * abs(weight) / (strongest or 1.0):.2f}"/>')
    return lines


def edge_count(built: Built, pruned) -> tuple[int, int]:
    """(edges kept among the shown nodes, edges drawn)."""
    shown = torch.tensor(shown_nodes(built, pruned), dtype=torch.long)
    kept = int(pruned.edges[shown][:, shown].sum()) if len(shown) else 0
    return kept, min(kept, MAX_EDGES)
