"""The contribution graph: shares from the proximity rule, checked against the [p, p, m] computation it avoids."""

import pytest
import torch
from torch.testing import assert_close

from llamaviz import flow
from tiny import hf_and_ours


@pytest.fixture(scope="module")
def cache():
    _, model = hf_and_ours("gqa")
    tokens = torch.randint(3, 113, (1, 9), generator=torch.Generator().manual_seed(7))
    return model.run_with_cache(tokens)[1]


def _brute_force_shares(cache, layer):
    """Every term written out as a vector: c[h, i, j] [h, p, p, m], then the proximity rule."""
    model = cache.model
    cfg = model.config
    pattern = cache["pattern", layer][0]  # [h, p, p]
    v = cache["v", layer][0].repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, dim=1)  # [p, h, d]
    w_o = model.model.layers[layer].self_attn.o_proj.weight.view(cfg.hidden_size, cfg.num_attention_heads, -1)
    terms = pattern[..., None] * torch.einsum("jhd,mhd->hjm", v, w_o)[:, None]  # [h, i, j, m]
    y = cache["resid_post", layer][0]
    resid, mlp = cache["resid_pre", layer][0], cache["mlp_out", layer][0]
    # the terms add up to the layer's output (no biases in this config)
    assert_close(terms.sum(dim=(0, 2)) + resid + mlp, y, atol=1e-5, rtol=0)
    proximity = lambda t: (y.norm(dim=-1) - (y - t).norm(dim=-1)).clamp(min=0)  # noqa: E731
    head = (y.norm(dim=-1)[None, :, None] - (y[None, :, None] - terms).norm(dim=-1)).clamp(min=0)
    total = head.sum(dim=(0, 2)) + proximity(resid) + proximity(mlp)
    return head / total[None, :, None], proximity(mlp) / total, proximity(resid) / total


def test_shares_equal_the_brute_force_and_chunking_changes_nothing(cache, monkeypatch):
    for layer in range(3):
        attn, mlp, resid = _brute_force_shares(cache, layer)
        shares = flow.layer_shares(cache, layer)
        assert_close(shares.attn, attn, atol=1e-5, rtol=0)
        assert_close(shares.mlp, mlp, atol=1e-5, rtol=0)
        assert_close(shares.resid, resid, atol=1e-5, rtol=0)
        total = shares.attn.sum(dim=(0, 2)) + shares.mlp + shares.resid
        assert_close(total, torch.ones(9), atol=1e-5, rtol=0)
    monkeypatch.setattr(flow, "QUERY_CHUNK", 2)
    assert_close(flow.layer_shares(cache, 1).attn, flow.layer_shares(cache, 1, queries=slice(0, 9)).attn)


def test_graph_reaches_the_position_through_edges_above_the_threshold(cache):
    graph = flow.information_flow(cache, position=-1, threshold=0.05)
    assert graph.nodes[0] == (3, 8)
    nodes = set(graph.nodes)
    for edge in graph.edges:
        assert edge.share >= 0.05 and (edge.layer + 1, edge.target) in nodes and (edge.layer, edge.source) in nodes
        assert edge.source <= edge.target
        share = flow.layer_shares(cache, edge.layer)
        expected = share.attn[edge.head, edge.target, edge.source] if edge.kind == "attn" else \
            getattr(share, edge.kind)[edge.target]
        assert abs(edge.share - float(expected)) < 1e-5
    assert any(e.kind == "attn" for e in flow.information_flow(cache, position=-1, threshold=0.001).edges)
    everything = flow.information_flow(cache, position=4, threshold=0.0)
    assert {n for n in everything.nodes if n[0] == 0} == {(0, i) for i in range(5)}


def test_edge_vectors_are_what_each_edge_writes(cache):
    edge = flow.FlowEdge(layer=1, source=2, target=5, kind="attn", head=3, share=0.0)
    vector = flow.edge_vector(cache, edge)
    u = flow.head_values(cache, 1)[3, 2]
    assert_close(vector, cache["pattern", 1][0, 3, 5, 2] * u)
    assert_close(flow.edge_vector(cache, flow.FlowEdge(1, 5, 5, "mlp", None, 0.0)), cache["mlp_out", 1][0, 5])


def test_bad_inputs(cache):
    with pytest.raises(ValueError, match=r"position 12 is out of range for 9 tokens"):
        flow.information_flow(cache, position=12)
    with pytest.raises(ValueError, match="threshold must be a share between 0 and 1"):
        flow.information_flow(cache, threshold=2)


@pytest.mark.slow
def test_flow_at_512_tokens_on_the_default_model(default_gguf):
    import llamaviz

    model, tok = llamaviz.load(default_gguf)
    tokens = torch.randint(100, 40000, (1, 512), generator=torch.Generator().manual_seed(8))
    names = lambda n: n.endswith(("hook_resid_pre", "hook_resid_post", "hook_mlp_out", "hook_v", "hook_pattern"))  # noqa: E731
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: names(n) or n == "hook_embed")
    graph = flow.information_flow(cache, position=-1, threshold=0.02)
    assert graph.nodes[0] == (30, 511) and graph.edges
    assert all(e.source <= e.target for e in graph.edges)
