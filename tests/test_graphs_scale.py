"""A node budget (circuit-tracer's max_feature_nodes): the kept features' rows are the full graph's rows,
the dropped features' effects move into the constants, and the rows' memory is what row_bytes states."""

from __future__ import annotations

import torch

from llamaviz import graphs
from llamaviz.graphs.attribution import row_bytes
from llamaviz.graphs.replacement import ReplacementRun
from test_graphs import setup, target_rows, target_values  # noqa: F401  (the module's fixture)


def kept_nodes(full, budgeted) -> torch.Tensor:
    """Indices in the full graph of the budgeted graph's nodes, in its order."""
    where = {tuple(row): i for i, row in enumerate(full.features.tolist())}
    n_f = len(full.features)
    features = torch.tensor([where[tuple(row)] for row in budgeted.features.tolist()], dtype=torch.long)
    return torch.cat([features, torch.arange(n_f, full.n)])


def test_a_node_budget_keeps_the_full_graphs_rows_and_the_targets_sums(setup):  # noqa: F811
    model, transcoders, ids, full = setup
    budget = len(full.features) // 2
    small = graphs.attribute(model, transcoders, ids, batch=5, max_feature_nodes=budget, update_interval=1)
    assert len(small.features) == budget and small.active_features == len(full.features)
    nodes = kept_nodes(full, small)
    targets = target_rows(small)
    torch.testing.assert_close(small.adjacency[targets], full.adjacency[nodes[targets]][:, nodes], atol=1e-10, rtol=1e-8)
    run = ReplacementRun(model, transcoders, ids)
    rebuilt = small.adjacency[targets].sum(1) + small.bias
    torch.testing.assert_close(rebuilt, target_values(run, small), atol=1e-3, rtol=1e-3)
    # the first features visited are the logits' strongest direct sources (influence through the logit rows)
    first = full.adjacency[-len(full.logit_tokens):, : len(full.features)].abs()
    share = (first / full.adjacency[-len(full.logit_tokens):].abs().sum(1, keepdim=True)).T @ full.logit_probs.double()
    assert int(share.argmax()) in nodes[: budget].tolist()


def test_row_bytes_is_the_rows_held(setup):  # noqa: F811
    from llamaviz.graphs.attribution import _Rows

    model, transcoders, ids, full = setup
    for budget in (None, 7):
        rows = _Rows(ReplacementRun(model, transcoders, ids), 10, 0.95, budget)
        assert rows.rows.nbytes == row_bytes(len(full.features), full.layers, full.positions, len(full.logit_tokens),
                                             budget, itemsize=8)
