"""The attribution graph of one prompt: direct effects in the frozen replacement model.

Nodes, in this order: active features (layer, position, index) with activation > 0, one error node
per (layer, position), one token-embedding node per position, and the top logits up to 0.95
cumulative probability (at most 10). rows[target, source] (one row per feature and logit target; errors
and tokens have no inputs) is the direct effect of the source on
the target's pre-activation: a feature's is activation x decoder row . d target / d mlp_out, an
error's its error vector . d target / d mlp_out, a token's its embedding . d target / d embed. A
logit target is the unembedding column minus the mean column, read through the frozen final norm.
Position 0 (BOS, the attention sink) carries no features, as in circuit-tracer.

The gradients come from the frozen model's written-out backward (graphs.linear), `batch` targets at
a time. With max_feature_nodes below the number of active features, rows are computed as
circuit-tracer does: the logits' first, then the features in order of their influence through the
rows so far (re-ranked every update_interval batches); the graph keeps the visited features.
Memory: the rows in computation, (max_feature_nodes + logits) x (active features + (L+1) x p)
numbers, plus the frozen patterns (L x h x p^2) and one batch's gradients (batch x p x m x 3);
`row_bytes` states the first before anything runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from llamaviz.graphs.linear import LinearBackward
from llamaviz.graphs.replacement import ReplacementRun


@dataclass
class Graph:
    ids: torch.Tensor            # [1, p] the prompt
    features: torch.Tensor       # [n_f, 3] (layer, position, index) of the feature nodes
    activations: torch.Tensor    # [n_f]
    logit_tokens: torch.Tensor   # [n_l] token ids of the logit nodes
    logit_probs: torch.Tensor    # [n_l]
    rows: torch.Tensor           # [n_f + n_l, n] the targets' adjacency rows (features, then logits); n = n_f + L*p + p + n_l
    layers: int
    bias: torch.Tensor           # [n_f + n_l] what no node carries: b_dec, b_enc, position 0's and unkept features
    active_features: int = -1    # how many features were active (n_f unless a node budget dropped some)

    @property
    def positions(self) -> int:
        return self.ids.shape[1]

    @property
    def n(self) -> int:
        """Nodes: features, errors, tokens, logits."""
        return self.rows.shape[1]

    @property
    def targets(self) -> torch.Tensor:
        """[n_f + n_l]: the node of each of `rows` (errors and tokens have no inputs, so no row)."""
        n_f, n_l = len(self.features), len(self.logit_tokens)
        return torch.cat([torch.arange(n_f), torch.arange(self.n - n_l, self.n)])

    @functools.cached_property
    def adjacency(self) -> torch.Tensor:
        """[n, n] target x source, dense (the rows in place, zeros for errors and tokens): for small graphs;
        pruning, scores and the JSON read `rows` and never build it."""
        dense = self.rows.new_zeros(self.n, self.n)
        dense[self.targets] = self.rows
        return dense

    def edge(self, target: int, source: int) -> float:
        """The direct effect of node source on node target (0 for a target without inputs)."""
        row = self.row_of(target)
        return 0.0 if row is None else float(self.rows[row, source])

    def row_of(self, target: int) -> int | None:
        """The row of node target in `rows` (None for errors and tokens, which have no inputs)."""
        n_f, first_logit = len(self.features), self.n - len(self.logit_tokens)
        if target < n_f:
            return target
        return n_f + target - first_logit if target >= first_logit else None

    def error_index(self, layer: int, position: int) -> int:
        return len(self.features) + layer * self.positions + position

    def token_index(self, position: int) -> int:
        return len(self.features) + self.layers * self.positions + position

    def logit_index(self, rank: int) -> int:
        return self.n - len(self.logit_tokens) + rank


def row_bytes(active: int, layers: int, positions: int, logits: int, max_feature_nodes: int | None,
              itemsize: int = 4) -> int:
    """Bytes of the rows held while a graph is computed (see the module docstring)."""
    rows = min(max_feature_nodes or active, active) + logits
    return rows * (active + (layers + 1) * positions) * itemsize


def attribute(model, transcoders, ids: torch.Tensor, max_logits: int = 10, cumulative: float = 0.95,
              batch: int = 16, max_feature_nodes: int | None = None, update_interval: int = 4) -> Graph:
    """The full (unpruned) graph of `ids` [1, p], or its top max_feature_nodes features; see the module docstring."""
    if max_feature_nodes is not None and max_feature_nodes < 0:
        raise ValueError(f"max_feature_nodes must be None (every active feature) or >= 0, got {max_feature_nodes}")
    if batch < 1 or update_interval < 1:
        raise ValueError(f"batch and update_interval must be >= 1, got {batch} and {update_interval}")
    run = ReplacementRun(model, transcoders, ids)
    rows = _Rows(run, max_logits, cumulative, max_feature_nodes)
    for chunk in _batches(list(range(rows.n_l)), batch):
        rows.compute([rows.n_f + rank for rank in chunk])
    while rows.visited.sum() < rows.budget:
        pending = rows.ranking(update_interval * batch)
        for chunk in _batches(pending, batch):
            rows.compute(chunk)
    return rows.graph()


def _runs(active: torch.Tensor, layer: int) -> list[tuple[int, int, int]]:
    """The spans of feature columns (active is sorted by layer, position, index) of one layer, by position."""
    columns = torch.nonzero(active[:, 0] == layer).flatten()
    if not len(columns):
        return []
    positions, counts = torch.unique_consecutive(active[columns, 1], return_counts=True)
    ends = (counts.cumsum(0) + columns[0]).tolist()
    return [(q, end - n, end) for q, n, end in zip(positions.tolist(), counts.tolist(), ends)]


def _batches(items: list, size: int) -> list[list]:
    return [items[start:start + size] for start in range(0, len(items), size)]


class _Rows:
    """Rows of the targets computed so far over every active feature's column, and their constants."""

    def __init__(self, run: ReplacementRun, max_logits: int, cumulative: float, max_feature_nodes):
        self.run, self.linear = run, LinearBackward(run)
        p, layers = run.ids.shape[1], run.layers
        found = [torch.nonzero(acts[1:] > 0) + torch.tensor([1, 0]) for acts in run.acts]  # skip position 0
        self.active = torch.cat([torch.cat([torch.full((len(f), 1), layer), f], dim=1)
                                 for layer, f in enumerate(found)])  # [n_f, 3] in (layer, position, index) order
        self.values = (torch.cat([run.acts[l][f[:, 0], f[:, 1]] for l, f in enumerate(found)])
                       if len(self.active) else torch.zeros(0, dtype=run.embed.dtype))
        probs = run.logits[0, -1].float().softmax(-1)
        ranked, tokens = probs.sort(descending=True)
        keep = int(min(max_logits, int((ranked.cumsum(0) < cumulative).sum()) + 1))
        self.logit_tokens, self.logit_probs = tokens[:keep], ranked[:keep]
        self.n_f, self.n_l = len(self.active), keep
        self.width = self.n_f + (layers + 1) * p  # every source column
        self.budget = self.n_f if max_feature_nodes is None else min(max_feature_nodes, self.n_f)
        dtype = run.embed.dtype
        self.rows = torch.zeros(self.budget + keep, self.width, dtype=dtype)
        self.constants = torch.zeros(self.budget + keep, dtype=dtype)
        self.norms = torch.ones(self.budget + keep, dtype=dtype)  # each row's sum of |entries|, once it is final
        self.node_of_row = torch.zeros(self.budget + keep, dtype=torch.long)  # node index (logits: n_f + rank)
        self.filled, self.visited = 0, torch.zeros(self.n_f, dtype=torch.bool)
        self.runs = [_runs(self.active, layer) for layer in range(layers)]  # (position, first, end) column spans
        unembed = run.model.lm_head.weight.detach().to(dtype)
        self.logit_directions = unembed[self.logit_tokens] - unembed.mean(0)  # [n_l, m]

    def ranking(self, count: int) -> list[int]:
        """The next `count` unvisited features (all of them in order, or the top by partial influence), by position."""
        left = int(self.budget - self.visited.sum())
        if self.budget == self.n_f:
            order = torch.argsort(self.active[:, 1] * (self.run.layers + 1) + self.active[:, 0], stable=True)
        else:
            order = torch.argsort(self.partial_influence()[: self.n_f], descending=True, stable=True)
        chosen = order[~self.visited[order]][: min(count, left)]
        # by position, then layer: a batch of nearby targets visits fewer positions and layers (same rows)
        key = self.active[chosen, 1] * (self.run.layers + 1) + self.active[chosen, 0]
        return chosen[torch.argsort(key, stable=True)].tolist()

    def partial_influence(self) -> torch.Tensor:
        """[width]: influence on the logits through the rows so far (circuit-tracer's ranking).

        A feature only reaches features of later layers and the logits, so the flow into each row is final
        once the rows of every later layer have theirs: one sweep down the layers, each row block read once,
        gives what iterating flow -> |rows| / norms to convergence gives."""
        rows, nodes, norms = self.rows[: self.filled], self.node_of_row[: self.filled], self.norms[: self.filled]
        is_feature = nodes < self.n_f
        layer = torch.where(is_feature, self.active[nodes.clamp(max=max(self.n_f - 1, 0)), 0], self.run.layers)
        flow = torch.zeros(self.filled, dtype=rows.dtype)
        logit_share = (self.logit_probs / self.logit_probs.sum()).to(rows.dtype)
        flow[~is_feature] = logit_share[nodes[~is_feature] - self.n_f]
        for below in reversed(range(self.run.layers)):
            targets = torch.nonzero(is_feature & (layer == below)).flatten()
            sources = torch.nonzero(layer > below).flatten()
            if len(targets) and len(sources):
                weights = flow[sources] / norms[sources]
                flow[targets] = weights @ rows.index_select(1, nodes[targets])[sources].abs()
        weights, total = flow / norms, torch.zeros(self.width, dtype=rows.dtype)
        step = max(1, (1 << 24) // max(1, self.width))  # temporaries of at most 16M numbers
        for start in range(0, len(rows), step):
            total += weights[start:start + step] @ rows[start:start + step].abs()
        return total

    def compute(self, nodes: list[int]) -> None:
        """Fill the rows of these targets (feature node indices; logits as n_f + rank) from one backward."""
        seeds, constants = [], []
        for node in nodes:
            if node >= self.n_f:
                seeds.append((self.run.layers, self.run.ids.shape[1] - 1,
                              self.linear.logit_seed(self.logit_directions[node - self.n_f])))
                constants.append(0.0)
            else:
                layer, position, index = self.active[node].tolist()
                tc = self.run.transcoders[layer]
                seeds.append((layer, position, self.linear.mlp_seed(layer, position, tc.W_enc[:, index].detach()
                                                                    .to(self.rows.dtype))))
                constants.append(float(tc.b_enc[index].detach()))
        block = self.rows[self.filled:self.filled + len(nodes)]
        decoded = torch.zeros(len(nodes), dtype=self.rows.dtype)
        with torch.no_grad():
            grad_embed = self.linear.backward(seeds, lambda layer, grad: self._visit(layer, grad, block, decoded))
            P = grad_embed.shape[1]
            start = self.n_f + self.run.layers * self.run.ids.shape[1]
            block[:, start:start + P] = (grad_embed * self.run.embed[:P]).sum(-1)
            # the constant part: every decoded output (b_dec and position 0 included) less the feature columns
            self.constants[self.filled:self.filled + len(nodes)] = (decoded - block[:, : self.n_f].sum(1)
                                                                    + torch.tensor(constants, dtype=decoded.dtype))
        self.node_of_row[self.filled:self.filled + len(nodes)] = torch.tensor(nodes)
        self.norms[self.filled:self.filled + len(nodes)] = block.abs().sum(1).clamp(min=1e-12)
        self.visited[[n for n in nodes if n < self.n_f]] = True
        self.filled += len(nodes)

    def _visit(self, layer: int, grad: torch.Tensor, block: torch.Tensor, decoded: torch.Tensor) -> None:
        """Columns of one layer's features and errors from d target / d mlp_out [c, P, m]."""
        run, P, p = self.run, grad.shape[1], self.run.ids.shape[1]
        decoded += (grad * run.constant[layer][:P]).sum((1, 2))
        start = self.n_f + layer * p
        block[:, start:start + P] = (grad * run.error[layer][:P]).sum(-1)
        w_dec = run.transcoders[layer].W_dec.detach()
        for position, lo, hi in self.runs[layer]:  # one product per position: [c, m] @ [m, features there]
            if position >= P:
                break
            decoders = w_dec.index_select(0, self.active[lo:hi, 2]).to(grad.dtype)
            block[:, lo:hi] = (grad[:, position] @ decoders.T) * self.values[lo:hi]

    def graph(self) -> Graph:
        """The graph over the visited features: rows in node order, columns of unvisited features dropped."""
        kept = torch.nonzero(self.visited).flatten()
        layers, p = self.run.layers, self.run.ids.shape[1]
        columns = torch.cat([kept, torch.arange(self.n_f, self.width)])
        order = self.node_of_row[: self.filled]
        rank = torch.full((self.n_f + self.n_l,), -1, dtype=torch.long)
        rank[kept] = torch.arange(len(kept))
        rank[self.n_f:] = torch.arange(self.n_l) + len(kept)  # target slots: kept features, then logits
        n = len(kept) + (layers + 1) * p + self.n_l
        rows = self.rows.new_zeros(len(kept) + self.n_l, n)
        bias = self.rows.new_zeros(len(kept) + self.n_l)
        slots = rank[order]
        rows[slots, : len(columns)] = self.rows[: self.filled].index_select(1, columns)
        dropped = self.rows[: self.filled][:, : self.n_f].sum(1) - self.rows[: self.filled][:, kept].sum(1)
        bias[slots] = self.constants[: self.filled] + dropped
        return Graph(self.run.ids, self.active[kept], self.values[kept], self.logit_tokens, self.logit_probs,
                     rows, layers, bias, self.n_f)
