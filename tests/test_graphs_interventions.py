"""Interventions: frozen (a zeroed feature moves a logit node by minus its edge) and live (checked against the
plain model's cached residual stream edited by hand), and generation with an edit at every new position."""

from __future__ import annotations

import pytest
import torch

from llamaviz import graphs
from test_graphs import setup  # noqa: F401  (the module's fixture)


def logit_node(logits: torch.Tensor, token: int) -> float:
    return float(logits[-1, token] - logits[-1].mean())


def test_zeroing_a_feature_in_the_frozen_model_moves_each_logit_by_minus_its_edge(setup):  # noqa: F811
    model, transcoders, ids, graph = setup
    source = int(graph.adjacency[graph.logit_index(0), : len(graph.features)].abs().argmax())
    layer, position, feature = graph.features[source].tolist()
    found = graphs.intervene(model, transcoders, ids, [(layer, position, feature, 0.0)], freeze_attention=True)
    with torch.no_grad():
        plain = model(ids, return_type="logits")[0]
    for rank, token in enumerate(graph.logit_tokens.tolist()):
        moved = logit_node(found["logits"], token) - logit_node(plain, token)
        assert abs(moved + float(graph.adjacency[graph.logit_index(rank), source])) <= 1e-6 + 1e-4 * abs(moved)


def edited_by_hand(model, transcoders, ids, feature: int, value: float, position: int) -> torch.Tensor:
    """[v] logits at `position` with the last layer's feature set to `value` there: cached stream, edited, re-normed."""
    last = model.config.num_hidden_layers - 1
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=[f"blocks.{last}.hook_resid_post", f"blocks.{last}.mlp.hook_in"])
        tc = transcoders[last]
        act = tc.encode(cache[f"blocks.{last}.mlp.hook_in"][0, position])[feature]
        resid = cache[f"blocks.{last}.hook_resid_post"][0, position] + (value - act) * tc.W_dec[feature]
        return model.lm_head(model.model.norm(resid[None]))[0]


def test_a_live_edit_equals_the_hand_edited_stream(setup):  # noqa: F811
    model, transcoders, ids, _ = setup
    last, p = model.config.num_hidden_layers - 1, ids.shape[1]
    found = graphs.intervene(model, transcoders, ids, [(last, p - 1, 3, 2.5)], freeze_attention=False, top=4)
    expected = edited_by_hand(model, transcoders, ids, 3, 2.5, p - 1)
    torch.testing.assert_close(found["logits"][-1], expected, atol=1e-6, rtol=1e-6)
    assert [t for t, _ in found["top"]] == expected.softmax(-1).topk(4).indices.tolist()
    with pytest.raises(ValueError, match="position 9 is out of range"):
        graphs.intervene(model, transcoders, ids, [(0, 9, 0, 0.0)])
    with pytest.raises(ValueError, match="an edit is"):
        graphs.intervene(model, transcoders, ids, [(0, 1)])


def test_generation_applies_the_edit_at_every_new_position(setup):  # noqa: F811
    model, transcoders, ids, _ = setup
    last = model.config.num_hidden_layers - 1
    tokens = graphs.generate_with(model, transcoders, ids, every=[(last, 5, 4.0)], max_new_tokens=3)
    expected = ids
    for step in range(3):  # the last layer writes after every attention: an edit moves only its own position
        at = expected.shape[1] - 1
        logits = edited_by_hand(model, transcoders, expected, 5, 4.0, at) if step else \
            model(expected, return_type="logits")[0, -1].detach()
        expected = torch.cat([expected, logits.argmax().view(1, 1)], dim=1)
    assert tokens.tolist() == expected.tolist()
    plain = graphs.generate_with(model, transcoders, ids, max_new_tokens=3)
    assert plain[0, ids.shape[1]] == tokens[0, ids.shape[1]]  # the first new token comes from the unedited prompt
