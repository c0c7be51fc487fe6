"""Head detectors on patterns built to show one behaviour each, and on a tiny model."""

import pytest
import torch

from llamaviz.interpret.detectors import (detect_heads, duplicate_token_scores, head_entropy, induction_scores,
                               previous_token_scores, repeated_random_tokens, sink_scores)
from llamaviz.interpret.interventions import ablate_heads
from tiny import hf_and_ours


def one_hot_pattern(targets: list[int]) -> torch.Tensor:
    """A [p, p] pattern where query i attends only to key targets[i]."""
    return torch.nn.functional.one_hot(torch.tensor(targets), len(targets)).float()


def test_each_detector_scores_its_own_behaviour_highest():
    tokens = repeated_random_tokens(vocab_size=1000, length=6, batch=1, bos_token_id=None)  # [1, 12]
    p, n = 12, 6
    previous = one_hot_pattern([max(i - 1, 0) for i in range(p)])
    sink = one_hot_pattern([0] * p)
    induction = one_hot_pattern([i - n + 1 if i >= n else 0 for i in range(p)])
    duplicate = one_hot_pattern([i - n if i >= n else 0 for i in range(p)])
    patterns = torch.stack([previous, sink, induction, duplicate])[None, None]  # [1 layer, 1, 4 heads, p, p]
    assert torch.argmax(previous_token_scores(patterns)[0]) == 0
    assert previous_token_scores(patterns)[0, 0] == 1
    assert sink_scores(patterns)[0, 1] == 1
    assert induction_scores(patterns, tokens)[0, 2] == 1 and torch.argmax(induction_scores(patterns, tokens)[0]) == 2
    assert duplicate_token_scores(patterns, tokens)[0, 3] == 1
    uniform = torch.ones(p, p).tril() / torch.arange(1, p + 1)[:, None]
    assert head_entropy(uniform[None, None, None])[0, 0] > head_entropy(patterns)[0, 0]


def test_detect_heads_on_a_model_returns_layer_by_head_scores():
    _, ours = hf_and_ours("gqa")
    scores = detect_heads(ours, length=10)
    assert set(scores) == {"previous-token", "induction", "sink", "duplicate-token", "entropy"}
    for name, value in scores.items():
        assert value.shape == (3, 4), name
        if name != "entropy":
            assert ((value >= 0) & (value <= 1 + 1e-6)).all(), name


def test_out_of_range_heads_and_unknown_modes_are_named():
    _, ours = hf_and_ours()
    with pytest.raises(ValueError, match=r"layer 5 is out of range: the model has 3 layers, 0\.\.2"):
        ablate_heads([(5, 0)], model=ours)
    with pytest.raises(ValueError, match=r"head 4 is out of range: the model has 4 heads per layer, 0\.\.3"):
        ablate_heads({1: [4]}, model=ours)
    with pytest.raises(ValueError, match=r"layer must be an integer in 0\.\.2, got 1\.5"):
        ablate_heads([(1.5, 0)], model=ours)  # not read as layer 1
    with pytest.raises(ValueError, match="ablation mode 'resample'"):
        ablate_heads([(0, 0)], mode="resample")


def brute_force_scores(patterns: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each score by loops over layer, batch, head and query on stacked patterns [layers, b, h, p, p]."""
    layers, b, h, p, _ = patterns.shape
    out = {kind: torch.zeros(layers, h) for kind in ("previous-token", "induction", "sink", "duplicate-token")}
    counts = dict.fromkeys(out, 0)
    for kind in out:
        for batch in range(b):
            for i in range(p):
                if kind == "previous-token":
                    keys = [i - 1] if i >= 1 else []
                elif kind == "sink":
                    keys = [0] if i >= 1 else []
                elif kind == "duplicate-token":
                    keys = [j for j in range(i) if tokens[batch, j] == tokens[batch, i]]
                else:
                    keys = [j for j in range(1, i) if tokens[batch, j - 1] == tokens[batch, i]]
                if keys:
                    out[kind] += patterns[:, batch, :, i, keys].sum(-1)
                    counts[kind] += 1
        out[kind] /= max(counts[kind], 1)
    out["entropy"] = -(patterns * patterns.clamp(min=1e-12).log()).sum(-1).mean(dim=(1, 3))
    return out


@pytest.mark.parametrize("padded", [False, True])
def test_head_scores_in_chunks_on_lazy_patterns_equal_the_brute_force(padded):
    from llamaviz.interpret.detectors import head_scores, stack_patterns

    _, ours = hf_and_ours("gqa")
    tokens = repeated_random_tokens(113, length=6, batch=2, bos_token_id=1)  # [2, 13]
    attention_mask = torch.ones_like(tokens)
    if padded:
        attention_mask[1, :2] = 0
    kwargs = dict(names_filter=lambda n: n.endswith("hook_pattern"), attention_mask=attention_mask)
    _, stored = ours.run_with_cache(tokens, **kwargs)
    _, lazy = ours.run_with_cache(tokens, patterns="lazy", **kwargs)
    expected = brute_force_scores(stack_patterns(stored), tokens)
    for cache in (lazy, stored):
        scores = head_scores(cache, chunk=4)  # blocks of 4 queries: 4 blocks, the last one short
        for kind, value in expected.items():
            torch.testing.assert_close(scores[kind], value, atol=1e-5, rtol=0, msg=kind)
    for kind, function in [("previous-token", previous_token_scores), ("sink", sink_scores),
                           ("entropy", head_entropy)]:
        torch.testing.assert_close(function(stack_patterns(stored)), expected[kind], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown head score 'copy'; accepted: previous-token"):
        head_scores(lazy, kinds=["copy"])


def test_scores_without_patterns_equal_the_brute_force_with_many_repeated_tokens(monkeypatch):
    """Five distinct tokens over 150 positions: most (query, key) pairs go through the per-token matmuls
    (causal_scores.BIG_GROUP), the rest through gathered pairs; also the blockwise log-sum-exp used off CPU."""
    from llamaviz import causal_scores
    from llamaviz.interpret.detectors import head_scores, stack_patterns

    _, ours = hf_and_ours("gqa", max_position_embeddings=256)
    tokens = torch.randint(3, 8, (2, 150), generator=torch.Generator().manual_seed(2))
    tokens[1, 100:] = torch.arange(50) + 20  # a tail of tokens seen once: small groups and no pairs
    names = dict(names_filter=lambda n: n.endswith("hook_pattern"))
    _, stored = ours.run_with_cache(tokens, **names)
    _, lazy = ours.run_with_cache(tokens, patterns="lazy", **names)
    assert causal_scores.applies(lazy.lazy, 0)
    expected = brute_force_scores(stack_patterns(stored), tokens)
    monkeypatch.setattr(causal_scores, "BIG_GROUP", 256)  # groups of ~30 x 30 pairs count as big here
    plans = causal_scores.plans("duplicate-token", tokens)
    assert plans[0].big and len(plans[1].pair_q)
    lazy.lazy.computed_heads = 0
    scores = head_scores(lazy)
    assert lazy.lazy.computed_heads == ours.config.num_hidden_layers * ours.config.num_attention_heads
    for kind, value in expected.items():
        torch.testing.assert_close(scores[kind], value, atol=1e-5, rtol=0, msg=kind)
    q, k = torch.randn(2, 3, 70, 8), torch.randn(2, 3, 70, 8)
    fused = causal_scores.log_sum_exp(q, k, 0.3)
    monkeypatch.setattr(causal_scores, "LSE_CHUNK", 16)
    monkeypatch.delattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", raising=False)
    for a, b in zip(causal_scores.log_sum_exp(q, k, 0.3), fused):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
