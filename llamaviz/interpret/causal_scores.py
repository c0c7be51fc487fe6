"""Head scores of a plain causal lazy layer without building its pattern.

A weight is exp(s - lse): the score s = scale * q . k of one (query, key) pair minus the query's
log-sum-exp over its keys. The fused attention kernel gives every query's lse in one pass that
never holds a [p, k] block (and, with the keys as values, the mean key each query reads, which
makes the entropy lse - scale * q . mean_key). The behaviours then need the scores of the keys they
predict only: the previous token, the first token, and earlier copies of the query's token (or the
tokens after them): a few dot products per query instead of the whole row. Same numbers as summing
the pattern (detectors._ScoreSums), at the cost of one attention pass per layer.
"""

from __future__ import annotations

import torch

from llamaviz.llama.attention import repeat_kv

BIG_GROUP = 4096  # a token whose (query, key) pairs exceed this is scored as one small matmul
LSE_CHUNK = 1024  # query rows per block where the fused kernel's log-sum-exp is not available


def applies(lazy, layer: int) -> bool:
    """True when `layer`'s lazy pattern is plain causal from position 0 (no padding, window or cache offset)."""
    mask = lazy.mask
    return (layer in lazy.pieces and mask.past_length == 0 and mask.key_length == mask.query_length
            and mask.is_plain)


def log_sum_exp(q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [b, h, p, d] float32 -> (lse [b, h, p] over each query's causal keys, mean key [b, h, p, d])."""
    if q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mean_key, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, 0.0, True,
                                                                                    scale=scale)[:2]
        return lse, mean_key
    lse, means = [], []
    for start in range(0, q.shape[2], LSE_CHUNK):  # elsewhere: blocks of rows, each over the keys it sees
        stop = min(q.shape[2], start + LSE_CHUNK)
        scores = torch.matmul(q[:, :, start:stop], k[:, :, :stop].transpose(-1, -2)) * scale
        rows = torch.arange(start, stop, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(stop, device=q.device)[None] > rows, float("-inf"))
        lse.append(scores.logsumexp(-1))
        means.append(torch.matmul(scores.softmax(-1), k[:, :, :stop]))
    return torch.cat(lse, dim=2), torch.cat(means, dim=2)


class PairPlan:
    """For one batch row: the (query, key) pairs a token behaviour predicts, small groups as index lists."""

    def __init__(self, query_tokens: torch.Tensor, key_labels: torch.Tensor):
        """Pair query i with key j when j < i and key_labels[j] == query_tokens[i]."""
        self.big: list[tuple[torch.Tensor, torch.Tensor]] = []  # (query positions, key positions) per token
        small_q, small_k = [], []
        for queries, keys in _positions_by_value(query_tokens, key_labels).values():
            if queries.max() <= keys.min():
                continue  # no key before any of these queries
            if len(queries) * len(keys) > BIG_GROUP:
                self.big.append((queries, keys))
                continue
            qi, kj = (grid.flatten() for grid in torch.meshgrid(queries, keys, indexing="ij"))
            keep = kj < qi
            small_q.append(qi[keep])
            small_k.append(kj[keep])
        self.pair_q = torch.cat(small_q) if small_q else torch.zeros(0, dtype=torch.long)
        self.pair_k = torch.cat(small_k) if small_k else torch.zeros(0, dtype=torch.long)

    def mass(self, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, int]:
        """(attention mass [h] summed over the queries that have a predicted key, how many such queries).

        q, k [h, p, d] and lse [h, p] of this batch row.
        """
        h, p = lse.shape
        per_query = lse.new_zeros(h, p)
        if len(self.pair_q):
            s = (q[:, self.pair_q] * k[:, self.pair_k]).sum(-1) * scale  # [h, P]
            per_query.index_add_(1, self.pair_q, torch.exp(s - lse[:, self.pair_q]))
        has_key = torch.zeros(p, dtype=torch.bool)
        has_key[self.pair_q] = True
        for queries, keys in self.big:
            s = torch.matmul(q[:, queries], k[:, keys].transpose(-1, -2)) * scale  # [h, nq, nk]
            earlier = keys[None] < queries[:, None]  # [nq, nk]
            weights = torch.exp(s - lse[:, queries, None]) * earlier
            per_query.index_add_(1, queries, weights.sum(-1))
            has_key[queries[earlier.any(-1)]] = True
        return per_query.sum(-1), int(has_key.sum())


def _positions_by_value(query_tokens: torch.Tensor, key_labels: torch.Tensor) -> dict:
    """value -> (positions of the queries holding it, positions of the keys labelled with it), for values in both."""
    groups = []
    for values in (query_tokens, key_labels):
        order = values.argsort(stable=True)
        distinct, counts = values[order].unique_consecutive(return_counts=True)
        groups.append(dict(zip(distinct.tolist(), order.split(counts.tolist()))))
    queries, keys = groups
    return {value: (queries[value], keys[value]) for value in queries.keys() & keys.keys()}


def plans(kind: str, tokens: torch.Tensor) -> list[PairPlan]:
    """One PairPlan per batch row for "duplicate-token" or "induction" (tokens [b, p])."""
    tokens = tokens.cpu()
    rows = []
    for row in tokens:
        labels = row if kind == "duplicate-token" else torch.cat([row.new_full((1,), -1), row[:-1]])
        rows.append(PairPlan(row, labels))
    return rows


@torch.no_grad()
def layer_scores(lazy, layer: int, kinds, pair_plans: dict[str, list[PairPlan]]) -> dict[str, torch.Tensor]:
    """Each kind's score [h] for `layer` (see detectors.DETECTORS), from rot_q / rot_k and one attention pass."""
    piece, scale = lazy.pieces[layer], lazy.scale
    p = piece.queries
    q = piece.rot_q(0, p, slice(None)).transpose(1, 2).float()  # [b, h, p, d]
    k = repeat_kv(piece.rot_k(None, slice(None)).transpose(1, 2).float(), piece.heads // piece.kv_heads)
    lazy.computed_heads += q.shape[1]
    lse, mean_key = log_sum_exp(q, k, scale)
    b = q.shape[0]
    out = {}
    for kind in kinds:
        if kind == "entropy":
            entropy = lse - scale * (q * mean_key).sum(-1)  # [b, h, p]: lse - E[s]
            out[kind] = entropy.double().sum(dim=(0, 2)) / (b * p)
        elif kind in ("previous-token", "sink"):
            keys = k[:, :, :-1] if kind == "previous-token" else k[:, :, :1]
            s = (q[:, :, 1:] * keys).sum(-1) * scale  # [b, h, p - 1]
            out[kind] = torch.exp(s - lse[:, :, 1:]).double().sum(dim=(0, 2)) / max(b * (p - 1), 1)
        else:
            masses = [plan.mass(q[i], k[i], lse[i], scale) for i, plan in enumerate(pair_plans[kind])]
            total = sum(mass.double() for mass, _ in masses)
            out[kind] = total / max(sum(count for _, count in masses), 1)
    return {kind: value.float().cpu() for kind, value in out.items()}

