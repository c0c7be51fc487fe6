"""circuit-tracer's graph JSON (schema 1) of a pruned graph: metadata, nodes and links."""

from __future__ import annotations

import json
from pathlib import Path

from llamaviz.graphs.attribution import Graph
from llamaviz.graphs.pruning import Pruned, scores


def _node(graph: Graph, index: int, tokenizer, pruned: Pruned) -> dict:
    n_f, p, n = len(graph.features), graph.positions, graph.adjacency.shape[0]
    base = {"influence": float(pruned.influence[index]), "run_idx": 0, "reverse_ctx_idx": 0, "clerp": ""}
    if index < n_f:
        layer, position, feature = graph.features[index].tolist()
        return base | {"node_id": f"{layer}_{feature}_{position}", "feature": feature, "layer": str(layer),
                       "ctx_idx": position, "feature_type": "cross layer transcoder", "token_prob": 0.0,
                       "is_target_logit": False, "activation": float(graph.activations[index])}
    if index < n_f + graph.layers * p:
        layer, position = divmod(index - n_f, p)
        return base | {"node_id": f"{layer}_error_{position}", "feature": None, "layer": str(layer),
                       "ctx_idx": position, "feature_type": "mlp reconstruction error", "token_prob": 0.0,
                       "is_target_logit": False, "activation": None}
    if index < n - len(graph.logit_tokens):
        position = index - n_f - graph.layers * p
        token = int(graph.ids[0, position])
        return base | {"node_id": f"E_{token}_{position}", "feature": position, "layer": "E", "ctx_idx": position,
                       "feature_type": "embedding", "token_prob": 0.0, "is_target_logit": False,
                       "activation": None, "clerp": f"Emb: {tokenizer.decode([token])!r}"}
    rank = index - (n - len(graph.logit_tokens))
    token = int(graph.logit_tokens[rank])
    return base | {"node_id": f"{graph.layers + 1}_{token}_{p - 1}", "feature": token, "layer": str(graph.layers + 1),
                   "ctx_idx": p - 1, "feature_type": "logit", "token_prob": float(graph.logit_probs[rank]),
                   "is_target_logit": rank == 0, "activation": None,
                   "clerp": f"Output {tokenizer.decode([token])!r} (p={float(graph.logit_probs[rank]):.3f})"}


def write_json(graph: Graph, pruned: Pruned, path, tokenizer, slug: str = "llamaviz-graph", scan: str = "") -> Path:
    kept = pruned.nodes.nonzero().flatten().tolist()
    nodes = [_node(graph, index, tokenizer, pruned) for index in kept]
    ids = {index: node["node_id"] for index, node in zip(kept, nodes)}
    links = [{"source": ids[int(s)], "target": ids[int(t)], "weight": float(graph.adjacency[t, s])}
             for t, s in pruned.edges.nonzero().tolist() if int(s) in ids and int(t) in ids]
    tokens = [tokenizer.decode([int(i)]) for i in graph.ids[0]]
    metadata = {"slug": slug, "scan": scan, "prompt_tokens": tokens, "prompt": "".join(tokens), "schema_version": 1,
                "info": scores(graph)}
    Path(path).write_text(json.dumps({"metadata": metadata, "qParams": {"pinnedIds": [], "supernodes": [],
                                                                         "linkType": "both"},
                                      "nodes": nodes, "links": links}))
    return Path(path)
