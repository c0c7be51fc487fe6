"""Head detectors: how strongly each head shows a known attention behaviour, as [layers, heads] tensors.

Each score is the attention mass a head puts on the key a behaviour predicts, averaged over the
queries where that key exists and over the batch. `head_scores(cache)` reads the cache one layer
and one block of queries at a time, so lazy patterns at 8K tokens never exist whole; a plain causal
lazy layer is scored without any pattern block (llamaviz/causal_scores.py: one fused attention pass
for each query's log-sum-exp, then the predicted keys' weights only). The functions on stacked
patterns [layers, b, h, p, k] give the same numbers for small inputs.
"""

from __future__ import annotations

import torch

from llamaviz.interpret import causal_scores
from llamaviz.llama.activation_cache import ActivationCache
from llamaviz.llama.lazy_patterns import pattern_rows


DETECTORS = ("previous-token", "induction", "sink", "duplicate-token", "entropy")
NEEDS_TOKENS = ("induction", "duplicate-token")


def stack_patterns(cache: ActivationCache) -> torch.Tensor:
    """Every layer's pattern from a cache: [layers, b, h, p, k] (small inputs only: it is quadratic)."""
    layers = cache._num_layers()
    return torch.stack([cache["pattern", layer] for layer in range(layers)]).float()


def _targets(kind: str, tokens: torch.Tensor | None, b: int, start: int, stop: int, p: int, k: int) -> torch.Tensor:
    """bool [b, stop - start, k]: the keys behaviour `kind` predicts for queries start..stop-1."""
    rows = torch.arange(start, stop)[:, None]  # [c, 1] query index
    keys = torch.arange(k)[None, :]  # [1, k]; key j sits at position j - (k - p) of the queries' frame
    if kind == "previous-token":
        return (keys == rows - 1 + (k - p)).expand(b, -1, -1) & (rows >= 1)
    if kind == "sink":
        return ((keys == 0) & (rows >= 1)).expand(b, -1, -1)
    if tokens is None or tokens.shape[1] != p or p != k:
        raise ValueError(f"the {kind} score needs tokens [b, p] with p == keys ({k}); got "
                         f"{None if tokens is None else tuple(tokens.shape)}")
    tokens = tokens.cpu()
    query_tokens = tokens[:, start:stop, None]  # [b, c, 1]
    earlier = (keys < rows)[None]  # [1, c, k]
    if kind == "duplicate-token":
        return (query_tokens == tokens[:, None, :]) & earlier
    before = torch.cat([tokens.new_full((b, 1), -1), tokens[:, :-1]], dim=1)  # [b, k] token before each key
    return (query_tokens == before[:, None, :]) & earlier  # induction: key follows an earlier copy


class _ScoreSums:
    """Running numerators [h] and denominators of each score over blocks of queries of one layer."""

    def __init__(self, kinds, heads: int):
        self.mass = {kind: torch.zeros(heads, dtype=torch.float64) for kind in kinds}
        self.count = dict.fromkeys(kinds, 0.0)

    def add(self, pattern: torch.Tensor, tokens, start: int, p: int, k: int) -> None:
        """pattern [b, h, c, k'] for queries start..start+c-1; keys beyond k' (if any) hold zero mass."""
        b, _, c, width = pattern.shape
        for kind in self.mass:
            if kind == "entropy":
                entropy = -(pattern * pattern.clamp(min=1e-12).log()).sum(-1)  # [b, h, c]
                self.mass[kind] += entropy.sum(dim=(0, 2)).double().cpu()
                self.count[kind] += b * c
                continue
            full = _targets(kind, tokens, b, start, start + c, p, k).to(pattern.device)  # [b, c, k]
            targets, counted = full[..., :width], full.any(-1)  # [b, c, k'], [b, c]
            mass = (pattern * targets[:, None]).sum(-1)  # [b, h, c]
            self.mass[kind] += (mass * counted[:, None]).sum(dim=(0, 2)).double().cpu()
            self.count[kind] += float(counted.sum())

    def result(self) -> dict[str, torch.Tensor]:
        return {kind: (mass / max(self.count[kind], 1.0)).float() for kind, mass in self.mass.items()}


def _scores_of_stack(kind: str, patterns: torch.Tensor, tokens=None) -> torch.Tensor:
    """One score on stacked patterns [layers, b, h, p, k] -> [layers, h]."""
    rows = []
    for layer_patterns in patterns:
        sums = _ScoreSums([kind], layer_patterns.shape[1])
        sums.add(layer_patterns.float(), tokens, 0, layer_patterns.shape[2], layer_patterns.shape[3])
        rows.append(sums.result()[kind])
    return torch.stack(rows)


def previous_token_scores(patterns: torch.Tensor) -> torch.Tensor:
    """Attention from each query to the token just before it."""
    return _scores_of_stack("previous-token", patterns)


def sink_scores(patterns: torch.Tensor) -> torch.Tensor:
    """Attention to the first position (the attention sink), from every query after it."""
    return _scores_of_stack("sink", patterns)


def duplicate_token_scores(patterns: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Attention from a token to earlier occurrences of the same token. tokens [b, p] (p == k)."""
    return _scores_of_stack("duplicate-token", patterns, tokens)


def induction_scores(patterns: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Attention from a token to the token after an earlier occurrence of it ([A][B] ... [A] -> [B])."""
    return _scores_of_stack("induction", patterns, tokens)


def head_entropy(patterns: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of each head's attention rows: [layers, heads]."""
    return _scores_of_stack("entropy", patterns)


def head_scores(cache: ActivationCache, tokens: torch.Tensor | None = None, kinds=DETECTORS,
                chunk: int = 512, progress=None) -> dict[str, torch.Tensor]:
    """Scores [layers, heads] per kind from a cache's patterns (lazy or stored), `chunk` queries at a time.

    A lazy block of causal queries is computed over the keys it can see only (the rest are exact
    zeros), so memory stays at one [b, h, chunk, k] block. `progress(done, total)` sees each layer.
    """
    unknown = [kind for kind in kinds if kind not in DETECTORS]
    if unknown:
        raise ValueError(f"unknown head score {unknown[0]!r}; accepted: {', '.join(DETECTORS)}")
    tokens = tokens if tokens is not None else cache.tokens
    tokens = tokens[None] if tokens is not None and tokens.dim() == 1 else tokens
    layers = cache._num_layers()
    rows: dict[str, list[torch.Tensor]] = {kind: [] for kind in kinds}
    pair_plans = None  # made at the first layer scored without patterns, then shared by all
    for layer in range(layers):
        if cache.lazy is not None and causal_scores.applies(cache.lazy, layer):  # no pattern built at all
            if pair_plans is None:
                pair_plans = _pair_plans(kinds, tokens, cache.lazy.mask.query_length)
            for kind, value in causal_scores.layer_scores(cache.lazy, layer, kinds, pair_plans).items():
                rows[kind].append(value)
            if progress is not None:
                progress(layer + 1, layers)
            continue
        first = pattern_rows(cache, layer, 0, 1, visible_only=False)  # [b, h, 1, k]
        h, k = first.shape[1], first.shape[3]
        p = _query_count(cache, layer)
        sums = _ScoreSums(kinds, h)
        for start in range(0, p, chunk):
            stop = min(p, start + chunk)
            block = pattern_rows(cache, layer, start, stop)
            sums.add(block.float(), tokens, start, p, k)
        for kind, value in sums.result().items():
            rows[kind].append(value)
        if progress is not None:
            progress(layer + 1, layers)
    return {kind: torch.stack(value) for kind, value in rows.items()}


def _pair_plans(kinds, tokens, p: int) -> dict:
    """The (query, key) pairs of the token behaviours, once for every layer; checks the tokens like _targets."""
    plans = {}
    for kind in kinds:
        if kind in NEEDS_TOKENS:
            if tokens is None or tokens.shape[1] != p:
                raise ValueError(f"the {kind} score needs tokens [b, p] with p == keys ({p}); got "
                                 f"{None if tokens is None else tuple(tokens.shape)}")
            plans[kind] = causal_scores.plans(kind, tokens)
    return plans


def _query_count(cache: ActivationCache, layer: int) -> int:
    if cache.lazy is not None and layer in cache.lazy.pieces:
        return cache.lazy.pieces[layer].queries
    return cache["pattern", layer].shape[-2]


def repeated_random_tokens(vocab_size: int, length: int = 50, batch: int = 4, bos_token_id: int | None = None,
                           seed: int = 0) -> torch.Tensor:
    """[b, 2 * length (+1)] ids: a random sequence then itself again, BOS first when given."""
    generator = torch.Generator().manual_seed(seed)
    low = 0 if bos_token_id is None else bos_token_id + 1
    half = torch.randint(low, vocab_size, (batch, length), generator=generator)
    tokens = torch.cat([half, half], dim=1)
    if bos_token_id is not None:
        tokens = torch.cat([torch.full((batch, 1), bos_token_id), tokens], dim=1)
    return tokens


@torch.no_grad()
def detect_heads(model, tokens: torch.Tensor | None = None, length: int = 50) -> dict[str, torch.Tensor]:
    """All five scores [layers, heads] on `tokens` (default: a repeated random sequence), lazily in chunks."""
    if tokens is None:
        tokens = repeated_random_tokens(model.config.vocab_size, length, bos_token_id=model.config.bos_token_id)
    tokens = tokens.to(model.device)
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"),
                                    patterns="lazy")
    return head_scores(cache, tokens)
