"""Influence pruning and the graph's scores, as the circuit-tracing method defines them.

The adjacency's absolute values, each target row normalised to sum 1, give A; the logits weighted
by their probabilities flow back through A (A is acyclic, so the sum of its powers is finite):
influence = w (A + A^2 + ...). Features are kept in order of influence up to node_threshold of the
total; edges between kept nodes in order of (target's influence x normalised weight) up to
edge_threshold. Tokens, errors and logits are always kept. The replacement score is the share of the
logits' influence that ends on tokens rather than on error nodes; the completeness score the share
of each node's normalised input that does not come from error nodes, weighted by influence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamaviz.graphs.attribution import Graph


@dataclass
class Pruned:
    nodes: torch.Tensor      # [n] bool: kept
    edges: torch.Tensor      # [n, n] bool: kept (target x source)
    influence: torch.Tensor  # [n] each node's influence on the logits


def normalized(adjacency: torch.Tensor) -> torch.Tensor:
    magnitude = adjacency.abs()
    return magnitude / magnitude.sum(1, keepdim=True).clamp(min=1e-12)


def influence(graph: Graph) -> torch.Tensor:
    """[n]: each node's influence on the logits (the logits themselves: their probabilities)."""
    a, n = normalized(graph.adjacency), graph.adjacency.shape[0]
    weights = graph.adjacency.new_zeros(n)
    weights[n - len(graph.logit_tokens):] = (graph.logit_probs / graph.logit_probs.sum()).to(weights.dtype)
    total, flow = torch.zeros_like(weights), weights
    for _ in range(graph.layers + 2):  # a path crosses each layer at most once, plus embedding and logit
        flow = flow @ a
        total += flow
    return total + weights


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    n, n_f = graph.adjacency.shape[0], len(graph.features)
    scores = influence(graph)
    nodes = torch.ones(n, dtype=torch.bool)
    if n_f:
        order = scores[:n_f].argsort(descending=True)
        cumulative = scores[:n_f][order].cumsum(0) / scores[:n_f].sum().clamp(min=1e-12)
        kept = order[: int((cumulative < node_threshold).sum()) + 1]
        nodes[:n_f] = False
        nodes[kept] = True
    edge_scores = normalized(graph.adjacency) * scores[:, None] * nodes[:, None] * nodes[None, :]
    flat = edge_scores.flatten()
    order = flat.argsort(descending=True)
    cumulative = flat[order].cumsum(0) / flat.sum().clamp(min=1e-12)
    edges = torch.zeros(n * n, dtype=torch.bool)
    edges[order[: int((cumulative < edge_threshold).sum()) + 1]] = True
    return Pruned(nodes, edges.view(n, n) & (graph.adjacency != 0), scores)


def scores(graph: Graph) -> dict[str, float]:
    """{"replacement": ..., "completeness": ...} of the unpruned graph."""
    n, n_f, p = graph.adjacency.shape[0], len(graph.features), graph.positions
    errors = slice(n_f, n_f + graph.layers * p)
    tokens = slice(n_f + graph.layers * p, n_f + graph.layers * p + p)
    total = influence(graph)
    replacement = float(total[tokens].sum() / (total[tokens].sum() + total[errors].sum()).clamp(min=1e-12))
    a = normalized(graph.adjacency)
    targets = torch.cat([torch.arange(n_f), torch.arange(n - len(graph.logit_tokens), n)])
    clean = 1 - a[targets][:, errors].sum(1)
    completeness = float((clean * total[targets]).sum() / total[targets].sum().clamp(min=1e-12))
    return {"replacement": replacement, "completeness": completeness}
