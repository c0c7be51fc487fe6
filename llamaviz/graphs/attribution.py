"""The attribution graph of one prompt: direct effects in the frozen replacement model.

Nodes, in this order: active features (layer, position, index) with activation > 0, one error node
per (layer, position), one token-embedding node per position, and the top logits up to 0.95
cumulative probability (at most 10). adjacency[target, source] is the direct effect of the source on
the target's pre-activation: a feature's is activation x decoder row . d target / d mlp_out, an
error's its error vector . d target / d mlp_out, a token's its embedding . d target / d embed. A
logit target is the unembedding column minus the mean column, read through the frozen final norm.
Gradients come from batched backward passes, `batch` targets per pass (one prompt copy each).
Position 0 (BOS, the attention sink) carries no features, as in circuit-tracer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamaviz.graphs.replacement import ReplacementRun


@dataclass
class Graph:
    ids: torch.Tensor            # [1, p] the prompt
    features: torch.Tensor       # [n_f, 3] (layer, position, index) of the active features
    activations: torch.Tensor    # [n_f]
    logit_tokens: torch.Tensor   # [n_l] token ids of the logit nodes
    logit_probs: torch.Tensor    # [n_l]
    adjacency: torch.Tensor      # [n, n] target x source; n = n_f + L*p + p + n_l
    layers: int
    bias: torch.Tensor           # [n_f + n_l] what no node carries: b_dec, b_enc, position 0's features

    @property
    def positions(self) -> int:
        return self.ids.shape[1]

    def error_index(self, layer: int, position: int) -> int:
        return len(self.features) + layer * self.positions + position

    def token_index(self, position: int) -> int:
        return len(self.features) + self.layers * self.positions + position

    def logit_index(self, rank: int) -> int:
        return self.adjacency.shape[0] - len(self.logit_tokens) + rank


def attribute(model, transcoders, ids: torch.Tensor, max_logits: int = 10, cumulative: float = 0.95,
              batch: int = 16) -> Graph:
    """The full (unpruned) graph of `ids` [1, p]; see the module docstring."""
    run = ReplacementRun(model, transcoders, ids)
    p, layers = ids.shape[1], run.layers
    found = [torch.nonzero(acts[1:] > 0) + torch.tensor([1, 0]) for acts in run.acts]  # skip position 0
    features = torch.cat([torch.cat([torch.full((len(f), 1), layer), f], dim=1) for layer, f in enumerate(found)])
    activations = torch.stack([run.acts[l][pos, i] for l, pos, i in features.tolist()]) if len(features) else torch.zeros(0)
    probs = run.logits[0, -1].float().softmax(-1)
    ranked, tokens = probs.sort(descending=True)
    keep = int(min(max_logits, int((ranked.cumsum(0) < cumulative).sum()) + 1))
    logit_tokens, logit_probs = tokens[:keep], ranked[:keep]
    n_f, n = len(features), len(features) + layers * p + p + keep
    adjacency, bias = torch.zeros(n, n, dtype=run.embed.dtype), torch.zeros(n_f + keep, dtype=run.embed.dtype)
    targets = [("feature", row) for row in range(n_f)] + [("logit", rank) for rank in range(keep)]
    for start in range(0, len(targets), batch):
        chunk = targets[start:start + batch]
        rows, biases = _rows(run, chunk, features, activations, logit_tokens)
        for (kind, index), row, constant in zip(chunk, rows, biases):
            target = index if kind == "feature" else n - keep + index
            adjacency[target] = row
            bias[target if kind == "feature" else n_f + index] = constant
    return Graph(ids, features, activations, logit_tokens, logit_probs, adjacency, layers, bias)


def _rows(run: ReplacementRun, chunk: list, features, activations, logit_tokens):
    """Adjacency rows [c, n] of a chunk of targets, from one batched backward, and each target's constant part."""
    logits, mlp_in, leaves = run.forward(len(chunk))
    values = []
    for copy, (kind, index) in enumerate(chunk):
        if kind == "feature":
            layer, position, feature = features[index].tolist()
            tc = run.transcoders[layer]
            values.append(mlp_in[layer][copy, position] @ tc.W_enc[:, feature] + tc.b_enc[feature])
        else:
            row = logits[copy, -1]
            values.append(row[logit_tokens[index]] - row.mean())
    torch.stack(values).sum().backward()
    for leaf in leaves.values():  # a leaf no target of this chunk depends on has no gradient
        if leaf.grad is None:
            leaf.grad = torch.zeros_like(leaf)
    with torch.no_grad():
        sources = _source_columns(run, leaves, features, activations)  # [c, n_sources]
        decoded = torch.stack([sum((leaves[layer].grad[copy] * run.constant[layer]).sum() for layer in range(run.layers))
                               for copy in range(len(chunk))])  # what every decoded output adds, b_dec included
        constants = decoded - sources[:, :len(features)].sum(1)  # less the feature nodes: b_dec and position 0
        for copy, (kind, index) in enumerate(chunk):
            if kind == "feature":
                constants[copy] += run.transcoders[int(features[index, 0])].b_enc[int(features[index, 2])]
        width = sources.shape[1]
        rows = sources.new_zeros(len(chunk), width + len(logit_tokens))
        rows[:, :width] = sources
    return rows, constants


def _source_columns(run: ReplacementRun, leaves: dict, features, activations) -> torch.Tensor:
    """[c, n_f + L*p + p]: every source's direct effect on each copy's target."""
    columns = []
    if len(features):
        layer, position, index = features.T
        grads = torch.stack([leaves[int(l)].grad[:, int(pos)] for l, pos in zip(layer, position)], dim=1)  # [c, n_f, m]
        decoders = torch.stack([run.transcoders[int(l)].W_dec[int(i)] for l, i in zip(layer, index)])  # [n_f, m]
        columns.append((grads * decoders).sum(-1) * activations)
    for layer in range(run.layers):
        columns.append((leaves[layer].grad * run.error[layer]).sum(-1))  # [c, p]
    columns.append((leaves["embed"].grad * run.embed).sum(-1))  # [c, p]
    return torch.cat(columns, dim=1)
