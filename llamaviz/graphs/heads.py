"""Head loadings: which attention heads carry a graph edge.

In the frozen replacement model an edge is a sum over paths from the source's vector to the target's
reading direction. Split the paths by the first attention head they cross: a path that crosses none
stays at the source's position (the residual stream and the skip paths), and one whose first crossing
is head h of layer l is the source's vector carried to layer l without attention, moved by that
head's OV circuit at its frozen pattern, then carried to the target by the whole frozen model. The
parts sum to the edge exactly; for a target at a later position than its source the direct part is
zero and the heads' parts alone make the edge.
"""

from __future__ import annotations

import torch

from llamaviz.graphs.attribution import Graph
from llamaviz.graphs.linear import LinearBackward
from llamaviz.graphs.replacement import ReplacementRun


def _source(run: ReplacementRun, graph: Graph, source: int) -> tuple[int, int, torch.Tensor]:
    """(layer it writes after, -1 for the embedding; position; vector [m]) of a source node."""
    n_f, p = len(graph.features), graph.positions
    if source < n_f:
        layer, position, index = graph.features[source].tolist()
        return layer, position, graph.activations[source] * run.transcoders[layer].W_dec[index].detach()
    if source < n_f + graph.layers * p:
        layer, position = divmod(source - n_f, p)
        return layer, position, run.error[layer][position]
    if source < n_f + (graph.layers + 1) * p:
        position = source - n_f - graph.layers * p
        return -1, position, run.embed[position]
    raise ValueError(f"node {source} is a logit, not a source; sources are 0..{n_f + (graph.layers + 1) * p - 1}")


def _target(linear: LinearBackward, run: ReplacementRun, graph: Graph, target: int) -> tuple[int, int, torch.Tensor]:
    """(layer whose resid_mid it reads, L for a logit; position; gradient seed [m]) of a target node."""
    n_f, n = len(graph.features), graph.n
    if target < n_f:
        layer, position, index = graph.features[target].tolist()
        return layer, position, linear.mlp_seed(layer, position, run.transcoders[layer].W_enc[:, index].detach())
    if target >= n - len(graph.logit_tokens):
        unembed = run.model.lm_head.weight.detach().to(run.embed.dtype)
        direction = unembed[graph.logit_tokens[target - (n - len(graph.logit_tokens))]] - unembed.mean(0)
        return run.layers, graph.positions - 1, linear.logit_seed(direction)
    raise ValueError(f"node {target} is not a target; targets are the features (0..{n_f - 1}) and the logits "
                     f"({n - len(graph.logit_tokens)}..{n - 1})")


def _mid_grads(linear: LinearBackward, layer: int, position: int, seed: torch.Tensor, P: int) -> dict:
    """{l: d target / d resid_mid of layer l [1, P, m]} for every layer the target reads through."""
    grad = seed.new_zeros(1, P, seed.shape[-1])
    if layer == linear.layers:
        grad[0, position] += seed
    mids = {}
    for l in reversed(range(min(layer, linear.layers - 1) + 1)):
        if l < layer:
            grad = grad + linear.skip_back(l, grad)
        else:
            grad[0, position] += seed
        mids[l] = grad
        grad = grad + linear.attention_back(l, grad)
    return mids


def head_loadings(model, transcoders, graph: Graph, target: int, source: int) -> dict:
    """{"heads": [L, h] each head's part (first crossing), "direct": the part crossing no head, "edge"}."""
    run = ReplacementRun(model, transcoders, graph.ids)
    linear = LinearBackward(run)
    with torch.no_grad():
        s_layer, s_pos, vector = _source(run, graph, source)
        t_layer, t_pos, seed = _target(linear, run, graph, target)
        heads = vector.new_zeros(run.layers, model.config.num_attention_heads)
        mids = _mid_grads(linear, t_layer, t_pos, seed, t_pos + 1)
        carried = vector.clone()  # the source's vector along the paths that crossed no head yet
        for layer in range(s_layer + 1, min(t_layer, run.layers - 1) + 1):
            if s_pos <= t_pos:
                per_head = linear.attention_back(layer, mids[layer], heads=True)  # [1, h, P, m]
                heads[layer] = per_head[0, :, s_pos] @ carried
            if layer < t_layer:  # the skip path of this layer's MLP; a feature target reads before it
                block = linear.blocks[layer]
                if block["W_skip"] is not None:
                    carried = carried + block["W_skip"] @ (carried * block["in2"] / block["s2"][s_pos, 0])
        direct = float(seed @ carried) if s_pos == t_pos else 0.0
    return {"heads": heads, "direct": direct, "edge": graph.edge(target, source)}
