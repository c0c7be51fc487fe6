"""A linear toy whose graph is known in closed form: one layer, q and k projections zero (so the frozen pattern
is uniform over the keys up to each query), a ReLU skip transcoder whose features are all active (it acts
linearly). Every edge is written out from the weights and the frozen norm scales and compared with attribute()."""

from __future__ import annotations

import torch

import llamaviz
from llamaviz import graphs
from llamaviz.llama.config import LlamaConfig
from tiny import config_kwargs
from test_features import random_set


def toy():
    torch.manual_seed(3)
    model = llamaviz.LlamaForCausalLM(LlamaConfig(**config_kwargs(num_hidden_layers=1))).eval().double()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.zero_()
        model.model.layers[0].self_attn.k_proj.weight.zero_()
        transcoders = random_set(layers=1).double()
        transcoders[0].b_enc.fill_(10.0)  # every feature active: the ReLU is the identity here
    return model, transcoders, torch.randint(3, 113, (1, 5), generator=torch.Generator().manual_seed(4))


def expected_adjacency(model, tc, ids, graph) -> torch.Tensor:
    """adjacency by the formula; scales s1, s2, s_final are the prompt's (the frozen norms)."""
    layer, p = model.model.layers[0], ids.shape[1]
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith(("hook_scale", "hook_embed", "mlp_out",
                                                                                      "mlp.hook_in")))
        embed = cache["hook_embed"][0]  # [p, m]
        s1, s2 = cache["blocks.0.ln1.hook_scale"][0, :, 0], cache["blocks.0.ln2.hook_scale"][0, :, 0]
        s_final = cache["ln_final.hook_scale"][0, -1, 0]
        heads, groups = model.config.num_attention_heads, model.config.num_attention_heads // model.config.num_key_value_heads
        d = model.config.head_dim
        w_v = layer.self_attn.v_proj.weight.view(-1, d, 64).repeat_interleave(groups, 0)  # [h, d, m]
        ov = layer.self_attn.o_proj.weight @ w_v.reshape(heads * d, 64)  # [m, m]: sum over heads of W_O,h W_V,h
        w1, w2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        n = graph.n
        mlp_out, mlp_in = cache["blocks.0.hook_mlp_out"][0, -1], cache["blocks.0.mlp.hook_in"][0, -1]
        error = mlp_out - tc.encode(mlp_in) @ tc.W_dec - tc.b_dec - tc.W_skip @ mlp_in
        expected = torch.zeros(n, n, dtype=torch.float64)
        # what token k puts in resid_mid at query q: itself at q, plus 1/(q+1) of its normed value through OV
        moved = lambda k, q: (embed[k] if k == q else 0) + ov @ (embed[k] * w1 / s1[k]) / (q + 1)  # noqa: E731
        for row, (_, q, f) in enumerate(graph.features.tolist()):
            for k in range(q + 1):
                expected[row, graph.token_index(k)] = tc.W_enc[:, f] @ (moved(k, q) * w2 / s2[q])
        unembed = model.lm_head.weight
        last = p - 1
        for rank, token in enumerate(graph.logit_tokens.tolist()):
            u = (unembed[token] - unembed.mean(0)) * model.model.norm.weight / s_final
            row = graph.logit_index(rank)
            through_skip = u + (u @ tc.W_skip) * w2 / s2[last]  # the residual plus the linear skip path
            for k in range(p):
                expected[row, graph.token_index(k)] = through_skip @ moved(k, last)
            for column, (_, q, f) in enumerate(graph.features.tolist()):
                if q == last:
                    expected[row, column] = graph.activations[column] * (u @ tc.W_dec[f])
            expected[row, graph.error_index(0, last)] = u @ error  # the MLP's output less the transcoder's
    return expected


def test_the_toy_graph_is_the_closed_form():
    model, transcoders, ids = toy()
    graph = graphs.attribute(model, transcoders, ids, batch=9)
    tc = transcoders[0]
    assert len(graph.features) == (ids.shape[1] - 1) * tc.W_dec.shape[0]  # all active, position 0 excluded
    torch.testing.assert_close(graph.adjacency, expected_adjacency(model, tc, ids, graph), atol=1e-6, rtol=1e-5)  # the norms round in float32
