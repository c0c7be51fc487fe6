"""Attribution graphs: a prompt's active transcoder features, error nodes, token embeddings and top
logits, joined by their direct effects in the frozen replacement model (the circuit-tracing method).

    graph = graphs.attribute(model, transcoders, ids)            # nodes, adjacency, scores
    kept = graphs.prune(graph)                                    # influence pruning (0.8 nodes, 0.98 edges)
    graphs.write_json(graph, kept, "graph.json", tokenizer)       # circuit-tracer's graph JSON

May import: llamaviz.llama, distributed, checkpoints, tokenizers, run, interpret, features.
Inside: replacement (the frozen model) <- attribution <- pruning <- export; qk (QK attribution).
"""

from llamaviz.graphs.attribution import Graph, attribute
from llamaviz.graphs.export import read_json, write_json
from llamaviz.graphs.heads import head_loadings
from llamaviz.graphs.interventions import generate_with, intervene, live_logits
from llamaviz.graphs.pruning import Pruned, prune, scores
from llamaviz.graphs.qk import qk_attribution

__all__ = ["Graph", "Pruned", "attribute", "generate_with", "head_loadings", "intervene", "live_logits", "prune", "qk_attribution", "read_json", "scores", "write_json"]
