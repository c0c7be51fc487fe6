"""Attribution graphs: every edge against a brute-force perturbation of the frozen replacement model, the
logits rebuilt from the nodes, pruning and circuit-tracer's JSON."""

from __future__ import annotations

import json

import pytest
import torch

from llamaviz import graphs
from llamaviz.graphs.replacement import ReplacementRun
from test_dashboards import Tok
from test_features import random_set
from tiny import hf_and_ours


@pytest.fixture(scope="module")
def setup():
    _, model = hf_and_ours("gqa")
    model.eval().double()  # float64: a random tiny model amplifies float32 rounding layer by layer
    transcoders = random_set(layers=model.config.num_hidden_layers).double()
    with torch.no_grad():
        for tc in transcoders:
            tc.b_enc.add_(0.05)  # enough active features to make a graph
    ids = torch.randint(3, 113, (1, 6), generator=torch.Generator().manual_seed(2))
    return model, transcoders, ids, graphs.attribute(model, transcoders, ids, batch=7)


def target_values(run: ReplacementRun, graph, additions=None) -> torch.Tensor:
    """Every target's value in the frozen model, brute force (no gradients)."""
    with torch.no_grad():
        logits, mlp_in, _ = run.forward(1, additions)
        values = [mlp_in[l][0, p] @ run.transcoders[l].W_enc[:, i] + run.transcoders[l].b_enc[i]
                  for l, p, i in graph.features.tolist()]
        values += [logits[0, -1, t] - logits[0, -1].mean() for t in graph.logit_tokens.tolist()]
    return torch.stack(values)


def target_rows(graph) -> torch.Tensor:
    """The adjacency rows of the targets: the features, then the logits."""
    n = graph.n
    return torch.cat([torch.arange(len(graph.features)), torch.arange(n - len(graph.logit_tokens), n)])


def test_the_frozen_model_reproduces_the_prompt(setup):
    model, transcoders, ids, _ = setup
    run = ReplacementRun(model, transcoders, ids)
    with torch.no_grad():
        logits, _, _ = run.forward(2)
        plain = model(ids, return_type="logits")
    torch.testing.assert_close(logits[1:], plain, atol=1e-4, rtol=1e-4)


def test_every_edge_is_the_brute_force_direct_effect(setup):
    model, transcoders, ids, graph = setup
    run = ReplacementRun(model, transcoders, ids)
    base = target_values(run, graph)
    n_f, targets = len(graph.features), target_rows(graph)
    assert n_f > 5
    for source in range(0, n_f, max(1, n_f // 12)):  # features: add the feature's own contribution once more
        layer, position, index = graph.features[source].tolist()
        push = torch.zeros(1, ids.shape[1], 64, dtype=torch.float64)
        push[0, position] = graph.activations[source] * transcoders[layer].W_dec[index].detach()
        moved = target_values(run, graph, {layer: push}) - base
        torch.testing.assert_close(graph.adjacency[targets, source], moved, atol=1e-4, rtol=1e-4)
    for layer, position in ((0, 3), (1, 5)):  # error nodes: add the error vector once more
        push = torch.zeros(1, ids.shape[1], 64, dtype=torch.float64)
        push[0, position] = run.error[layer][position]
        moved = target_values(run, graph, {layer: push}) - base
        torch.testing.assert_close(graph.adjacency[targets, graph.error_index(layer, position)], moved,
                                   atol=1e-4, rtol=1e-4)


def test_the_nodes_and_constants_rebuild_every_target(setup):
    model, transcoders, ids, graph = setup
    run = ReplacementRun(model, transcoders, ids)
    values = target_values(run, graph)
    n_f, targets = len(graph.features), target_rows(graph)
    rebuilt = graph.adjacency[targets].sum(1) + graph.bias
    # the norms compute in float32 even in a float64 model, and this random model amplifies that rounding
    torch.testing.assert_close(rebuilt, values, atol=1e-3, rtol=1e-3)
    assert graph.adjacency[:, graph.n - len(graph.logit_tokens):].abs().sum() == 0  # logits are sinks


def test_pruning_scores_and_json(setup, tmp_path):
    _, _, _, graph = setup
    pruned = graphs.prune(graph)
    n_f = len(graph.features)
    assert pruned.nodes[n_f:].all() and 0 < pruned.nodes[:n_f].sum() <= n_f
    assert not pruned.edges[:, ~pruned.nodes].any() and not pruned.edges[~pruned.nodes].any()
    kept_share = pruned.influence[:n_f][pruned.nodes[:n_f]].sum() / pruned.influence[:n_f].sum()
    assert kept_share >= 0.8 - 1e-6
    found = graphs.scores(graph)
    assert 0 < found["replacement"] <= 1 and 0 < found["completeness"] <= 1
    path = graphs.write_json(graph, pruned, tmp_path / "graph.json", Tok())
    data = json.loads(path.read_text())
    assert data["metadata"]["schema_version"] == 1 and len(data["metadata"]["prompt_tokens"]) == 6
    ids = {node["node_id"] for node in data["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in data["links"])
    assert sum(node["is_target_logit"] for node in data["nodes"]) == 1
    with pytest.raises(ValueError, match="ids must be"):
        graphs.attribute(setup[0], setup[1], torch.zeros(2, 3, dtype=torch.long))


def test_qk_attribution_sums_exactly_to_the_heads_score(setup):
    model, transcoders, ids, graph = setup
    found = graphs.qk_attribution(model, transcoders, graph, layer=2, head=1, query=5, key=3)
    terms = found["terms"]
    assert terms.shape == (len(found["labels"]),) * 2
    # exact up to rounding: the terms are large and cancel, so compare with their total size
    assert abs(terms.sum().item() - found["score"]) <= 1e-6 * terms.abs().sum().item()
    assert (terms.abs() > 1e-9).sum() > 4  # spread over many pairs, not one
    with pytest.raises(ValueError, match="key <= query"):
        graphs.qk_attribution(model, transcoders, graph, 2, 1, 3, 5)
