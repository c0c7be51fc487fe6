"""Head loadings of a graph edge: the parts (first head crossed) sum to the edge, and each head's part is a
brute-force perturbation of the frozen model with the earlier layers' and the other heads' patterns zeroed, less
the same with every head of its layer zeroed (the paths that pass that layer on the residual stream)."""

from __future__ import annotations

import copy

import pytest
import torch

from llamaviz import graphs
from llamaviz.graphs.replacement import ReplacementRun
from test_graphs import setup, target_values  # noqa: F401  (the module's fixture)


def first_crossing_run(run: ReplacementRun, source_layer: int, layer: int, head: int | None) -> ReplacementRun:
    """The frozen run with attention off at layers (source_layer, layer) and only `head` (None: none) on at `layer`."""
    cut = copy.copy(run)
    cut.frozen = dict(run.frozen)
    for l in range(source_layer + 1, layer + 1):
        pattern = torch.zeros_like(run.frozen[f"blocks.{l}.attn.hook_pattern"])
        if l == layer and head is not None:
            pattern[:, head] = run.frozen[f"blocks.{l}.attn.hook_pattern"][:, head]
        cut.frozen[f"blocks.{l}.attn.hook_pattern"] = pattern
    return cut


def pick_edge(graph, source_layer: int, target_layer: int) -> tuple[int, int]:
    """The strongest edge from a feature of source_layer to a feature of target_layer at a later position."""
    features = graph.features
    best, pair = 0.0, None
    for t in torch.nonzero(features[:, 0] == target_layer).flatten().tolist():
        for s in torch.nonzero(features[:, 0] == source_layer).flatten().tolist():
            if features[s, 1] < features[t, 1] and abs(graph.adjacency[t, s]) > best:
                best, pair = abs(float(graph.adjacency[t, s])), (t, s)
    assert pair is not None and best > 1e-6
    return pair


def test_head_parts_sum_to_the_edge_and_match_brute_force(setup):  # noqa: F811
    model, transcoders, ids, graph = setup
    target, source = pick_edge(graph, source_layer=0, target_layer=2)
    found = graphs.head_loadings(model, transcoders, graph, target, source)
    assert found["direct"] == 0.0  # a later position: every path crosses a head
    assert abs(found["heads"].sum().item() - found["edge"]) <= 1e-8 + 1e-6 * abs(found["edge"])
    run = ReplacementRun(model, transcoders, ids)
    layer_s, position, index = graph.features[source].tolist()
    push = torch.zeros(1, ids.shape[1], 64, dtype=torch.float64)
    push[0, position] = graph.activations[source] * transcoders[layer_s].W_dec[index].detach()

    def moved(cut):  # the direct effect of the source on the target in a cut model
        return float((target_values(cut, graph, {layer_s: push}) - target_values(cut, graph))[target])

    for layer in (1, 2):
        none = moved(first_crossing_run(run, layer_s, layer, None))  # paths crossing no head up to `layer`
        for head in range(model.config.num_attention_heads):
            part = moved(first_crossing_run(run, layer_s, layer, head)) - none
            assert abs(float(found["heads"][layer, head]) - part) <= 1e-8 + 1e-5 * abs(part)
    assert not found["heads"][0].any()  # the source writes after layer 0's attention


def test_same_position_edges_have_a_direct_part_and_bad_nodes_are_named(setup):  # noqa: F811
    model, transcoders, _, graph = setup
    logit = graph.logit_index(0)
    token = graph.token_index(graph.positions - 1)
    found = graphs.head_loadings(model, transcoders, graph, logit, token)
    assert found["direct"] != 0.0
    total = found["direct"] + found["heads"].sum().item()
    assert abs(total - found["edge"]) <= 1e-8 + 1e-6 * abs(found["edge"])
    with pytest.raises(ValueError, match="not a target"):
        graphs.head_loadings(model, transcoders, graph, graph.error_index(0, 1), token)
    with pytest.raises(ValueError, match="is a logit"):
        graphs.head_loadings(model, transcoders, graph, logit, logit)
