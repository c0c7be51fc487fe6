"""QK attribution: why a head attends from a query to a key, in the graph's nodes.

In the frozen replacement model the residual stream entering a layer is a sum of parts, one per
node (a feature's activation x decoder row, an error vector, a token's embedding, carried forward
through the frozen attention and the skip paths) plus the constant part (b_dec and position 0's
features). With the norm's scale frozen, q and k after RoPE are linear in that stream, so
score(query, key) = sum over (query part, key part) of scale * rot_q(part) . rot_k(part'), exactly.
Each part's rot_q / rot_k is read from a forward of the frozen model in which only that part is on.
"""

from __future__ import annotations

import torch

from llamaviz.graphs.attribution import Graph
from llamaviz.graphs.replacement import ReplacementRun, _constant, _eager, _keep


def parts(run: ReplacementRun, graph: Graph, layer: int) -> tuple[list[str], dict, dict]:
    """(labels, embed inputs [c, p, m], mlp inputs {layer: [c, p, m]}) with one part per node below `layer`."""
    p, m = graph.positions, run.embed.shape[-1]
    labels, embeds, mlps = [], [], []
    zero = torch.zeros(p, m, dtype=run.embed.dtype)
    for node, (l, pos, i) in enumerate(graph.features.tolist()):
        if l < layer:
            vector = zero.clone()
            vector[pos] = graph.activations[node] * run.transcoders[l].W_dec[i].detach()
            labels.append(f"feature {l}/{pos}/{i}"), embeds.append(zero), mlps.append({l: vector})
    for l in range(layer):
        for pos in range(p):
            vector = zero.clone()
            vector[pos] = run.error[l][pos]
            labels.append(f"error {l}/{pos}"), embeds.append(zero), mlps.append({l: vector})
    for pos in range(p):
        vector = zero.clone()
        vector[pos] = run.embed[pos]
        labels.append(f"token {pos}"), embeds.append(vector), mlps.append({})
    constant = {}
    for l in range(layer):
        rest = run.constant[l].clone()
        for node, (fl, pos, i) in enumerate(graph.features.tolist()):
            if fl == l:
                rest[pos] -= graph.activations[node] * run.transcoders[l].W_dec[i].detach()
        constant[l] = rest
    labels.append("constant (b_dec, position 0)"), embeds.append(zero), mlps.append(constant)
    return labels, embeds, mlps


def rotated(run: ReplacementRun, layer: int, embeds: list, mlps: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(rot_q [c, p, h, d], rot_k [c, p, g, d]) at `layer` of each part alone in the frozen model."""
    copies, p = len(embeds), run.ids.shape[1]
    embed = torch.stack(embeds)
    mlp = {l: torch.stack([parts_.get(l, torch.zeros_like(embeds[0])) for parts_ in mlps]) for l in range(run.layers)}
    live_in, seen = {}, {}
    hooks = [(name, _constant(value)) for name, value in run.frozen.items() if name != "hook_embed"]
    hooks.append(("hook_embed", lambda x, hook: embed))
    for l, tc in enumerate(run.transcoders):
        hooks.append((f"blocks.{l}.mlp.hook_in", _keep(live_in, l)))

        def replace(out, hook, l=l, tc=tc):
            skip = live_in[l] @ tc.W_skip.T if hasattr(tc, "W_skip") else 0
            return mlp[l] + skip

        hooks.append((f"blocks.{l}.hook_mlp_out", replace))
    for name in ("rot_q", "rot_k"):
        hooks.append((f"blocks.{layer}.attn.hook_{name}", _keep(seen, name)))
    with torch.no_grad(), _eager(run.model), run.model.hooks(fwd_hooks=hooks):
        run.model(run.ids.expand(copies, p), return_type=None)
    return seen["rot_q"], seen["rot_k"]


def qk_attribution(model, transcoders, graph: Graph, layer: int, head: int, query: int, key: int) -> dict:
    """{"labels": [n], "terms": [n, n] (query part x key part), "score": the model's score} for one head."""
    config = model.config
    if not 0 <= head < config.num_attention_heads:
        raise ValueError(f"head {head} is out of range; accepted: 0..{config.num_attention_heads - 1}")
    if not 0 <= key <= query < graph.positions:
        raise ValueError(f"need 0 <= key <= query < {graph.positions}; got query {query}, key {key}")
    config.check_layer(layer)
    run = ReplacementRun(model, transcoders, graph.ids)
    labels, embeds, mlps = parts(run, graph, layer)
    rot_q, rot_k = rotated(run, layer, embeds, mlps)
    group = head // (config.num_attention_heads // config.num_key_value_heads)
    scale = model.model.layers[layer].self_attn.scale
    terms = scale * rot_q[:, query, head] @ rot_k[:, key, group].T  # [n, n]
    with torch.no_grad(), _eager(model):
        _, cache = model.run_with_cache(graph.ids, names_filter=[f"blocks.{layer}.attn.hook_attn_scores"])
    return {"labels": labels, "terms": terms, "score": float(cache[f"blocks.{layer}.attn.hook_attn_scores"][0, head, query, key])}
