"""Contribution graph: which earlier tokens, through which heads, and which MLPs built a position's residual.

One layer turns the residual x_i into y_i = x_i + sum_{j, h} c_{h,i,j} + mlp_i, where
c_{h,i,j} = pattern[h, i, j] * u_{h,j} and u_{h,j} = v_j of h's kv head through h's slice of o_proj.
Each term t gets the share max(0, |y| - |y - t|) of y, normalised over the layer's terms (the
proximity rule of the LLM Transparency Tool's information-flow routes). The distances come from dot
products (|y - c|^2 = |y|^2 - 2 a (y . u) + a^2 |u|^2), so no [p, p, m] tensor is ever built; queries
are processed in chunks so memory stays at [h, chunk, p].

Graph nodes are (layer, position): the residual stream entering `layer` (layer L = the final
residual). Edges run from (layer, source) to (layer + 1, target): "attn" via a head, "mlp", "resid".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

QUERY_CHUNK = 256


@dataclass(frozen=True)
class FlowEdge:
    layer: int  # the edge runs from (layer, source) to (layer + 1, target)
    source: int
    target: int
    kind: str  # "attn" | "mlp" | "resid"
    head: int | None
    share: float  # of the target's residual update at this layer, 0..1


@dataclass
class FlowGraph:
    position: int
    threshold: float
    nodes: list[tuple[int, int]] = field(default_factory=list)  # (layer, position), reached from the target
    edges: list[FlowEdge] = field(default_factory=list)


@dataclass
class LayerShares:
    attn: torch.Tensor  # [h, p, p]: share of head h from source j in target i's update
    mlp: torch.Tensor  # [p]
    resid: torch.Tensor  # [p]


def head_values(cache, layer: int, batch: int = 0) -> torch.Tensor:
    """u [h, p, m]: each position's value vector through each head's slice of o_proj (what it can write)."""
    model = cache._require_model("information flow")
    cfg = model.config
    v = cache[f"blocks.{layer}.attn.hook_v"][batch].float()  # [p, g, d]
    v = v.repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, dim=1)  # [p, h, d]
    w_o = model.model.layers[layer].self_attn.o_proj.weight.detach().float().to(v.device)
    w_o = w_o.view(cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim)  # [m, h, d]
    return torch.einsum("phd,mhd->hpm", v, w_o)


def layer_shares(cache, layer: int, batch: int = 0, queries: slice | None = None) -> LayerShares:
    """Every term's normalised share of each target position's residual update at `layer` (queries a window)."""
    resid = cache[f"blocks.{layer}.hook_resid_pre"][batch].float()  # [p, m]
    out = cache[f"blocks.{layer}.hook_resid_post"][batch].float()  # [p, m]
    mlp = cache[f"blocks.{layer}.hook_mlp_out"][batch].float()  # [p, m]
    pattern = cache["pattern", layer][batch].float()  # [h, p, k]
    u = head_values(cache, layer, batch)  # [h, k, m]
    u_sq = u.pow(2).sum(-1)  # [h, k]
    queries = queries or slice(0, resid.shape[0])
    rows = range(resid.shape[0])[queries]
    attn, mlp_share, resid_share = [], [], []
    for start in range(rows.start, rows.stop, QUERY_CHUNK):
        q = slice(start, min(start + QUERY_CHUNK, rows.stop))
        y = out[q]  # [c, m]
        y_norm = y.norm(dim=-1)  # [c]
        a = pattern[:, q]  # [h, c, k]
        y_u = torch.einsum("cm,hkm->hck", y, u)  # [h, c, k]
        dist = (y_norm.pow(2)[None, :, None] - 2 * a * y_u + a.pow(2) * u_sq[:, None]).clamp(min=0).sqrt()
        head = (y_norm[None, :, None] - dist).clamp(min=0)  # [h, c, k]
        own = (y_norm - (y - resid[q]).norm(dim=-1)).clamp(min=0)  # [c]
        ffn = (y_norm - (y - mlp[q]).norm(dim=-1)).clamp(min=0)  # [c]
        total = (head.sum(dim=(0, 2)) + own + ffn).clamp(min=1e-12)
        attn.append(head / total[None, :, None])
        resid_share.append(own / total)
        mlp_share.append(ffn / total)
    return LayerShares(torch.cat(attn, dim=1), torch.cat(mlp_share), torch.cat(resid_share))


def information_flow(cache, position: int = -1, threshold: float = 0.04, batch: int = 0) -> FlowGraph:
    """The edges with share >= threshold (and above zero) that reach (L, position), walking back from the last layer."""
    model = cache._require_model("information_flow")
    layers = model.config.num_hidden_layers
    p = cache["hook_embed"].shape[1]
    if isinstance(position, bool) or not isinstance(position, int) or not -p <= position < p:
        raise ValueError(f"position {position!r} is out of range for {p} tokens; accepted: {-p}..{p - 1}")
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a share between 0 and 1, got {threshold!r}")
    position = position % p
    graph = FlowGraph(position, threshold, nodes=[(layers, position)])
    frontier = {position}
    for layer in range(layers - 1, -1, -1):
        reached: set[int] = set()
        window = slice(min(frontier), max(frontier) + 1)  # causal: sources never lie after the last target
        shares = layer_shares(cache, layer, batch, window)
        for target in sorted(frontier):
            row = target - window.start
            reached |= _edges_into(graph, shares, layer, target, row, threshold)
        graph.nodes.extend((layer, source) for source in sorted(reached))
        frontier = reached
        if not frontier:
            break
    return graph


def _edges_into(graph: FlowGraph, shares: LayerShares, layer: int, target: int, row: int, threshold: float):
    sources = set()
    for kind, share in (("resid", shares.resid[row]), ("mlp", shares.mlp[row])):
        if share >= threshold and share > 0:
            graph.edges.append(FlowEdge(layer, target, target, kind, None, float(share)))
            sources.add(target)
    row_shares = shares.attn[:, row]  # [h, k]
    heads, keys = ((row_shares >= threshold) & (row_shares > 0)).nonzero(as_tuple=True)
    for head, source in zip(heads.tolist(), keys.tolist()):
        graph.edges.append(FlowEdge(layer, source, target, "attn", head, float(shares.attn[head, row, source])))
        sources.add(source)
    return sources


def edge_vector(cache, edge: FlowEdge, batch: int = 0) -> torch.Tensor:
    """What an edge writes into the residual stream [m] (for the tokens it promotes through the unembedding)."""
    if edge.kind == "attn":
        weight = cache["pattern", edge.layer][batch, edge.head, edge.target, edge.source].float()
        return weight * head_values(cache, edge.layer, batch)[edge.head, edge.source]
    name = "hook_mlp_out" if edge.kind == "mlp" else "hook_resid_pre"
    return cache[f"blocks.{edge.layer}.{name}"][batch, edge.target].float()
