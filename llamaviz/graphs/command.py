"""`llamaviz graph "prompt" --transcoders DIR --out graph.json`: build, prune and save a prompt's graph,
printing the replacement and completeness scores and the top feature nodes by influence."""

from __future__ import annotations

from pathlib import Path

import torch

from llamaviz.features.transcoder_set import TranscoderSet
from llamaviz.graphs.attribution import attribute
from llamaviz.graphs.export import write_json
from llamaviz.graphs.pruning import prune, scores
from llamaviz.run.loading import load


def add_parser(commands) -> None:
    graph = commands.add_parser("graph", help="the attribution graph of a prompt on a transcoder set",
                                description="Build a prompt's attribution graph (circuit-tracing method), prune it "
                                            "and write circuit-tracer's graph JSON.")
    graph.add_argument("prompt", help="the text (BOS is prepended as the tokenizer does)")
    graph.add_argument("--transcoders", required=True, help="a transcoder set folder (config.yaml + layer_{i}.safetensors)")
    graph.add_argument("--out", default="graph.json", help="the graph JSON to write (default graph.json)")
    graph.add_argument("--model", default=None, help="checkpoint folder or .gguf (default: the default model)")
    graph.add_argument("--max-feature-nodes", type=int, default=None, help="node budget (default: every active feature)")
    graph.add_argument("--node-threshold", type=float, default=0.8, help="pruning: share of influence kept (0.8)")
    graph.add_argument("--edge-threshold", type=float, default=0.98, help="pruning: share of edge score kept (0.98)")
    graph.add_argument("--top", type=int, default=10, help="feature nodes to print (default 10)")
    graph.add_argument("--batch", type=int, default=64, help="targets per backward pass (default 64)")


def run(args) -> int:
    model, tokenizer = load(args.model, dtype=torch.float32)
    transcoders = TranscoderSet.load(args.transcoders)
    ids = torch.tensor([tokenizer.encode(args.prompt)])
    with torch.no_grad():
        graph = attribute(model, transcoders, ids, batch=args.batch, max_feature_nodes=args.max_feature_nodes)
    pruned = prune(graph, args.node_threshold, args.edge_threshold)
    path = write_json(graph, pruned, args.out, tokenizer)
    found = scores(graph)
    print(f"tokens {graph.positions}, active features {graph.active_features}, feature nodes {len(graph.features)}, "
          f"kept {int(pruned.nodes[: len(graph.features)].sum())}")
    print(f"replacement score {found['replacement']:.3f}, completeness score {found['completeness']:.3f}")
    for line in top_nodes(graph, pruned, tokenizer, args.top):
        print(line)
    print(f"wrote {Path(path)}")
    return 0


def top_nodes(graph, pruned, tokenizer, count: int) -> list[str]:
    """'influence  layer L  position P 'token'  feature F  activation A' for the most influential features."""
    n_f = len(graph.features)
    order = pruned.influence[:n_f].argsort(descending=True)[:count].tolist()
    lines = []
    for index in order:
        layer, position, feature = graph.features[index].tolist()
        token = tokenizer.decode([int(graph.ids[0, position])])
        lines.append(f"{float(pruned.influence[index]):8.4f}  layer {layer:>2}  position {position:>3} {token!r:<12} "
                     f"feature {feature:>6}  activation {float(graph.activations[index]):.3f}")
    return lines
