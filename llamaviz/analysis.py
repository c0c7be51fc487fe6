"""Head detectors: how strongly each head shows a known attention behaviour, as [layers, heads] tensors.

Each score is the attention mass a head puts on the key a behaviour predicts, averaged over the
queries where that key exists and over the batch. Patterns come stacked as [layers, b, h, p, k].
"""

from __future__ import annotations

import torch

from llamaviz.llama.activation_cache import ActivationCache


def stack_patterns(cache: ActivationCache) -> torch.Tensor:
    """Every layer's pattern from a cache: [layers, b, h, p, k]."""
    layers = cache._num_layers()
    return torch.stack([cache["pattern", layer] for layer in range(layers)]).float()


def _masked_mean(patterns: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over batch and queries of the mass on `targets` [b, p, k] (bool); queries with none skipped."""
    mass = (patterns * targets[None, :, None]).sum(-1)  # [layers, b, h, p]
    counted = targets.any(-1)  # [b, p]
    weight = counted[None, :, None].float()
    return (mass * weight).sum(dim=(1, 3)) / weight.sum(dim=(1, 3)).clamp(min=1)  # [layers, h]


def previous_token_scores(patterns: torch.Tensor) -> torch.Tensor:
    """Attention from each query to the token just before it."""
    b, p, k = patterns.shape[1], patterns.shape[3], patterns.shape[4]
    targets = torch.zeros(b, p, k, dtype=torch.bool, device=patterns.device)
    rows = torch.arange(1, p, device=patterns.device)
    targets[:, rows, rows - 1 + (k - p)] = True
    return _masked_mean(patterns, targets)


def sink_scores(patterns: torch.Tensor) -> torch.Tensor:
    """Attention to the first position (the attention sink), from every query after it."""
    b, p, k = patterns.shape[1], patterns.shape[3], patterns.shape[4]
    targets = torch.zeros(b, p, k, dtype=torch.bool, device=patterns.device)
    targets[:, 1:, 0] = True
    return _masked_mean(patterns, targets)


def duplicate_token_scores(patterns: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Attention from a token to earlier occurrences of the same token. tokens [b, p] (p == k)."""
    same = tokens[:, :, None] == tokens[:, None, :]  # [b, p, k]
    earlier = torch.ones_like(same).tril(-1)
    return _masked_mean(patterns, same & earlier)


def induction_scores(patterns: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Attention from a token to the token after an earlier occurrence of it ([A][B] ... [A] -> [B])."""
    same = tokens[:, :, None] == tokens[:, None, :]  # [b, p, k]: key j holds the query's token
    after = torch.zeros_like(same)
    after[:, :, 1:] = same[:, :, :-1]  # key j follows an occurrence of the query's token
    earlier = torch.ones_like(same).tril(-1)
    return _masked_mean(patterns, after & earlier)


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
    """All four scores [layers, heads] on `tokens` (default: a repeated random sequence)."""
    if tokens is None:
        tokens = repeated_random_tokens(model.config.vocab_size, length, bos_token_id=model.config.bos_token_id)
    tokens = tokens.to(model.device)
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    patterns = stack_patterns(cache)
    return {
        "previous-token": previous_token_scores(patterns),
        "induction": induction_scores(patterns, tokens),
        "sink": sink_scores(patterns),
        "duplicate-token": duplicate_token_scores(patterns, tokens),
        "entropy": head_entropy(patterns),
    }


def head_entropy(patterns: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of each head's attention rows: [layers, heads]."""
    entropy = -(patterns * patterns.clamp(min=1e-12).log()).sum(-1)  # [layers, b, h, p]
    return entropy.mean(dim=(1, 3))
