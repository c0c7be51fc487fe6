"""Influence pruning and the graph's scores, as the circuit-tracing method defines them.

The adjacency's rows (graph.rows: one per feature and logit target) in absolute value, each normalised
to sum 1, give A; the logits weighted by their probabilities flow back through A (A is acyclic, so the
sum of its powers is finite):
influence = w (A + A^2 + ...). Features are kept in order of influence up to node_threshold of the
total; edges between kept nodes in order of (target's influence x normalised weight) up to
edge_threshold. Tokens, errors and logits are always kept. The replacement score is the share of the
logits' influence that ends on tokens rather than on error nodes; the completeness score the share
of each node's normalised input that does not come from error nodes, weighted by influence.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from llamaviz.graphs.attribution import Graph


@dataclass
class Pruned:
    nodes: torch.Tensor      # [n] bool: kept
    edge_rows: torch.Tensor  # [n_f + n_l, n] bool: kept edges into each target (graph.rows' layout)
    influence: torch.Tensor  # [n] each node's influence on the logits
    targets: torch.Tensor    # [n_f + n_l] the node of each edge row (graph.targets)

    @functools.cached_property
    def edges(self) -> torch.Tensor:
        """[n, n] bool target x source, dense (for small graphs)."""
        n = self.edge_rows.shape[1]
        dense = torch.zeros(n, n, dtype=torch.bool)
        dense[self.targets] = self.edge_rows
        return dense

    def links(self) -> torch.Tensor:
        """[k, 2] (target node, source node) of the kept edges, without a dense matrix."""
        rows, sources = self.edge_rows.nonzero(as_tuple=True)
        return torch.stack([self.targets[rows], sources], dim=1)


def normalized(rows: torch.Tensor) -> torch.Tensor:
    magnitude = rows.abs()
    return magnitude / magnitude.sum(1, keepdim=True).clamp(min=1e-12)


def influence(graph: Graph) -> torch.Tensor:
    """[n]: each node's influence on the logits (the logits themselves: their probabilities)."""
    a, targets = normalized(graph.rows), graph.targets
    weights = graph.rows.new_zeros(graph.n)
    weights[graph.n - len(graph.logit_tokens):] = (graph.logit_probs / graph.logit_probs.sum()).to(weights.dtype)
    total, flow = torch.zeros_like(weights), weights
    for _ in range(graph.layers + 2):  # a path crosses each layer at most once, plus embedding and logit
        flow = flow[targets] @ a
        total += flow
    return total + weights


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    n, n_f, targets = graph.n, len(graph.features), graph.targets
    scores = influence(graph)
    nodes = torch.ones(n, dtype=torch.bool)
    if n_f:
        order = scores[:n_f].argsort(descending=True)
        cumulative = scores[:n_f][order].cumsum(0) / scores[:n_f].sum().clamp(min=1e-12)
        kept = order[: int((cumulative < node_threshold).sum()) + 1]
        nodes[:n_f] = False
        nodes[kept] = True
    edge_scores = normalized(graph.rows) * (scores[targets] * nodes[targets])[:, None] * nodes[None, :]
    flat = edge_scores.flatten()
    order = flat.argsort(descending=True)
    cumulative = flat[order].cumsum(0) / flat.sum().clamp(min=1e-12)
    edges = torch.zeros(flat.numel(), dtype=torch.bool)
    edges[order[: int((cumulative < edge_threshold).sum()) + 1]] = True
    return Pruned(nodes, edges.view_as(graph.rows) & (graph.rows != 0), scores, targets)


def scores(graph: Graph) -> dict[str, float]:
    """{"replacement": ..., "completeness": ...} of the unpruned graph."""
    n_f, p = len(graph.features), graph.positions
    errors = slice(n_f, n_f + graph.layers * p)
    tokens = slice(n_f + graph.layers * p, n_f + graph.layers * p + p)
    total = influence(graph)
    replacement = float(total[tokens].sum() / (total[tokens].sum() + total[errors].sum()).clamp(min=1e-12))
    clean = 1 - normalized(graph.rows)[:, errors].sum(1)
    targets = graph.targets
    completeness = float((clean * total[targets]).sum() / total[targets].sum().clamp(min=1e-12))
    return {"replacement": replacement, "completeness": completeness}
