"""circuit-tracer's graph JSON (schema 1) of a pruned graph: metadata, nodes and links; and reading one back.

Node ids as circuit-tracer writes them: a feature "{layer}_{index}_{position}", a token
"E_{token}_{position}", a logit "{L+1}_{token}_{p-1}"; an error "{layer}_error_{position}" (feature -1;
circuit-tracer writes "0_{layer}_{position}", which can collide with a layer-0 feature's id, so read_json
takes either and, for a colliding id, the feature).
read_json rebuilds a Graph over the file's nodes with the links as its adjacency rows (a pruned graph:
the edges the file kept, every other entry zero) and a Pruned marking them all kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llamaviz.graphs.attribution import Graph
from llamaviz.graphs.pruning import Pruned, scores


def _cantor(a: int, b: int) -> int:
    """circuit-tracer's feature number of (layer, index): the Cantor pairing."""
    return (a + b) * (a + b + 1) // 2 + b


def _node(graph: Graph, index: int, tokenizer, pruned: Pruned) -> dict:
    n_f, p, n = len(graph.features), graph.positions, graph.n
    base = {"influence": float(pruned.influence[index]), "run_idx": 0, "reverse_ctx_idx": 0, "clerp": ""}
    if index < n_f:
        layer, position, feature = graph.features[index].tolist()
        return base | {"node_id": f"{layer}_{feature}_{position}", "feature": _cantor(layer, feature), "layer": str(layer),
                       "jsNodeId": f"{layer}_{feature}-0",
                       "ctx_idx": position, "feature_type": "cross layer transcoder", "token_prob": 0.0,
                       "is_target_logit": False, "activation": float(graph.activations[index])}
    if index < n_f + graph.layers * p:
        layer, position = divmod(index - n_f, p)
        return base | {"node_id": f"{layer}_error_{position}", "feature": -1, "layer": str(layer),
                       "jsNodeId": f"{layer}_{position}-0",
                       "ctx_idx": position, "feature_type": "mlp reconstruction error", "token_prob": 0.0,
                       "is_target_logit": False, "activation": None}
    if index < n - len(graph.logit_tokens):
        position = index - n_f - graph.layers * p
        token = int(graph.ids[0, position])
        return base | {"node_id": f"E_{token}_{position}", "feature": position, "layer": "E", "ctx_idx": position,
                       "jsNodeId": f"E_{token}-{position}",
                       "feature_type": "embedding", "token_prob": 0.0, "is_target_logit": False,
                       "activation": None, "clerp": f"Emb: {tokenizer.decode([token])!r}"}
    rank = index - (n - len(graph.logit_tokens))
    token = int(graph.logit_tokens[rank])
    return base | {"node_id": f"{graph.layers + 1}_{token}_{p - 1}", "feature": token, "layer": str(graph.layers + 1),
                   "jsNodeId": f"L_{token}-{p - 1}",
                   "ctx_idx": p - 1, "feature_type": "logit", "token_prob": float(graph.logit_probs[rank]),
                   "is_target_logit": rank == 0, "activation": None,
                   "clerp": f"Output {tokenizer.decode([token])!r} (p={float(graph.logit_probs[rank]):.3f})"}


def write_json(graph: Graph, pruned: Pruned, path, tokenizer, slug: str = "llamaviz-graph", scan: str = "") -> Path:
    kept = pruned.nodes.nonzero().flatten().tolist()
    nodes = [_node(graph, index, tokenizer, pruned) for index in kept]
    ids = {index: node["node_id"] for index, node in zip(kept, nodes)}
    rows, sources = pruned.edge_rows.nonzero(as_tuple=True)
    found = zip(pruned.targets[rows].tolist(), sources.tolist(), graph.rows[rows, sources].tolist())
    links = [{"source": ids[s], "target": ids[t], "weight": w} for t, s, w in found if s in ids and t in ids]
    tokens = [tokenizer.decode([int(i)]) for i in graph.ids[0]]
    metadata = {"slug": slug, "scan": scan, "prompt_tokens": tokens, "prompt": "".join(tokens), "schema_version": 1,
                "info": scores(graph)}
    Path(path).write_text(json.dumps({"metadata": metadata, "qParams": {"pinnedIds": [], "supernodes": [],
                                                                         "linkType": "both"},
                                      "nodes": nodes, "links": links}))
    return Path(path)


def _parse_node(node: dict) -> tuple[str, tuple]:
    """(kind, key) of a node: feature (layer, position, index), error (layer, position), token (position, id), logit."""
    kind, parts = node.get("feature_type"), str(node["node_id"]).split("_")
    try:
        if kind == "embedding":
            return "token", (int(node["ctx_idx"]), int(parts[1]))
        if kind == "logit":
            return "logit", (int(parts[1]), float(node.get("token_prob", 0.0)))
        if kind == "mlp reconstruction error":
            layer = int(node["layer"])
            return "error", (layer, int(node["ctx_idx"]))
        if kind in ("cross layer transcoder", "transcoder"):
            return "feature", (int(node["layer"]), int(node["ctx_idx"]), int(parts[1]))
    except (ValueError, IndexError, KeyError) as err:
        raise ValueError(f"graph JSON node {node.get('node_id')!r} is malformed ({err})") from None
    raise ValueError(f"graph JSON node {node.get('node_id')!r} has feature_type {kind!r}; accepted: cross layer "
                     "transcoder, mlp reconstruction error, embedding, logit")


def read_json(path, layers: int | None = None) -> tuple[Graph, Pruned]:
    """(Graph, Pruned) of a circuit-tracer graph JSON (ours or theirs). layers: the model's (default: logit layer - 1)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        nodes, links = data["nodes"], data["links"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a circuit-tracer graph JSON (needs metadata, nodes, links): {err}") from None
    parsed = [(_parse_node(node), node) for node in nodes]
    if layers is None:
        logit_layers = {int(node["layer"]) for (kind, _), node in parsed if kind == "logit"}
        if len(logit_layers) != 1:
            raise ValueError(f"{path}: cannot tell the model's layers from the logit nodes; pass layers=")
        layers = logit_layers.pop() - 1
    tokens = {key[0]: key[1] for (kind, key), _ in parsed if kind == "token"}
    p = max([key[0] for (kind, key), _ in parsed if kind == "token"] +
            [int(node["ctx_idx"]) for _, node in parsed]) + 1
    ids = torch.tensor([[tokens.get(position, 0) for position in range(p)]])
    features = sorted((key, node) for (kind, key), node in parsed if kind == "feature")
    logits = sorted(((key, node) for (kind, key), node in parsed if kind == "logit"), key=lambda item: -item[0][1])
    n_f, n_l = len(features), len(logits)
    n = n_f + (layers + 1) * p + n_l
    index = {node["node_id"]: n_f + key[0] * p + key[1] for (kind, key), node in parsed if kind == "error"}
    index |= {node["node_id"]: i for i, (_, node) in enumerate(features)}
    index |= {node["node_id"]: n_f + layers * p + key[0] for (kind, key), node in parsed if kind == "token"}
    index |= {node["node_id"]: n - n_l + rank for rank, (_, node) in enumerate(logits)}
    rows, edges = torch.zeros(n_f + n_l, n), torch.zeros(n_f + n_l, n, dtype=torch.bool)
    for link in links:
        if link["source"] not in index or link["target"] not in index:
            raise ValueError(f"{path}: link {link['source']} -> {link['target']} names a node that is not listed")
        target, source = index[link["target"]], index[link["source"]]
        if n_f <= target < n - n_l:
            raise ValueError(f"{path}: link {link['source']} -> {link['target']} ends on an error or embedding "
                             "node; links end on features and logits")
        row = target if target < n_f else target - (n - n_l) + n_f
        rows[row, source], edges[row, source] = float(link["weight"]), True
    kept = torch.zeros(n, dtype=torch.bool)
    kept[list(index.values())] = True
    influence = torch.zeros(n)
    for _, node in parsed:
        influence[index[node["node_id"]]] = float(node.get("influence") or 0.0)
    graph = Graph(ids, torch.tensor([key for key, _ in features], dtype=torch.long).view(-1, 3),
                  torch.tensor([float(node.get("activation") or 0.0) for _, node in features]),
                  torch.tensor([key[0] for key, _ in logits], dtype=torch.long),
                  torch.tensor([key[1] for key, _ in logits]), rows, layers, torch.zeros(n_f + n_l), n_f)
    return graph, Pruned(kept, edges, influence, graph.targets)
