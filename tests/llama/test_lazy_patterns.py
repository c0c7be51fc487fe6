"""Lazy patterns: computed from rot_q / rot_k and the mask recipe, equal to captured ones (1e-6, float32)."""

import pytest
import torch
from torch.testing import assert_close

import llamaviz
from llamaviz.llama import attention
from llamaviz.llama.activation_cache import ActivationCache
from llamaviz.llama.cache import StaticCache
from llamaviz.llama.capture import capture_sizes
from llamaviz.llama.config import LlamaConfig
from llamaviz.llama.masks import AttentionMask, attend_somewhere, build_mask

from tiny import config_kwargs

EXACT = dict(atol=1e-6, rtol=0)
PATTERN_LIKE = lambda name: name.endswith(("hook_pattern", "hook_attn_scores"))  # noqa: E731


def tiny(variant="gqa", **overrides):
    torch.manual_seed(0)
    return llamaviz.LlamaForCausalLM(LlamaConfig(**config_kwargs(variant, **overrides))).eval()


def ids_of(batch, length, seed=1):
    return torch.randint(3, 113, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_patterns(lazy, stored, layers=3):
    for layer in range(layers):
        for kind in ("pattern", "attn_scores"):
            assert_close(lazy[kind, layer], stored[kind, layer], **EXACT, msg=f"{kind} {layer}")


@pytest.mark.parametrize("variant, mode", [("default", "lazy"), ("gqa", "lazy"), ("mqa_head_dim", "lazy"),
                                           ("gqa", "recompute"), ("bias", "recompute")])
def test_lazy_equals_stored_with_left_padding(variant, mode):
    model = tiny(variant)
    ids = ids_of(2, 9)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0
    _, stored = model.run_with_cache(ids, names_filter=PATTERN_LIKE, attention_mask=attention_mask)
    _, lazy = model.run_with_cache(ids, names_filter=PATTERN_LIKE, attention_mask=attention_mask, patterns=mode)
    assert lazy.lazy is not None and stored.lazy is None
    assert set(lazy) == set(stored)  # the names asked for, not their rot_q/rot_k pieces
    assert_same_patterns(lazy, stored)


@pytest.mark.parametrize("mode", ["lazy", "recompute"])
def test_lazy_equals_stored_with_a_sliding_window(mode):
    model = tiny(sliding_window=4)
    ids = ids_of(1, 11)
    _, stored = model.run_with_cache(ids, names_filter=PATTERN_LIKE)
    _, lazy = model.run_with_cache(ids, names_filter=PATTERN_LIKE, patterns=mode)
    assert_same_patterns(lazy, stored)
    assert bool((lazy["pattern", 0][0, :, 10, :7] == 0).all())  # keys 4+ back are outside the window


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_lazy_equals_stored_after_a_kv_cache_offset(cache_kind):
    model = tiny()
    ids = ids_of(2, 10)

    def prefilled():
        cache = StaticCache(3, 2, 2, 16, 12, torch.float32, "cpu") if cache_kind == "static" else None
        out = model(ids[:, :6], past_key_values=cache, use_cache=True)
        return out.past_key_values

    _, stored = model.run_with_cache(ids[:, 6:], names_filter=PATTERN_LIKE, past_key_values=prefilled())
    _, lazy = model.run_with_cache(ids[:, 6:], names_filter=PATTERN_LIKE, past_key_values=prefilled(),
                                   patterns="lazy")
    assert lazy["pattern", 1].shape == stored["pattern", 1].shape == (2, 4, 4, 12 if cache_kind == "static" else 10)
    assert_same_patterns(lazy, stored)


def test_generation_keeps_lazy_patterns_equal_to_stored_ones():
    model = tiny("llama3_rope")
    prompt = ids_of(2, 5, seed=3)
    attention_mask = torch.ones_like(prompt)
    attention_mask[0, :2] = 0
    kwargs = dict(max_new_tokens=6, eos_token_id=[], attention_mask=attention_mask, names_filter=PATTERN_LIKE)
    sequences, lazy = model.generate_with_cache(prompt, **kwargs)  # lazy is generate_with_cache's default
    same, stored = model.generate_with_cache(prompt, patterns="stored", **kwargs)
    again, recomputed = model.generate_with_cache(prompt, patterns="recompute", **kwargs)
    assert torch.equal(sequences, same) and torch.equal(sequences, again)
    assert lazy.lazy is not None and stored.lazy is None and recomputed.lazy.nbytes < lazy.lazy.nbytes
    full_mask = torch.cat([attention_mask, torch.ones(2, 5, dtype=attention_mask.dtype)], dim=1)
    _, reference = model.run_with_cache(sequences[:, :-1], names_filter=PATTERN_LIKE, attention_mask=full_mask)
    rows = full_mask.bool()[:, None].expand(-1, 4, -1)  # [b, h, T] real queries: padding rows differ by design
    for layer in range(3):  # (a padding query attends over what was there at its step, here the prompt)
        for kind in ("pattern", "attn_scores"):
            assert_close(lazy[kind, layer][rows], reference[kind, layer][rows], **EXACT, msg=f"{kind} {layer}")
            assert_close(lazy[kind, layer][rows], stored[kind, layer][rows], **EXACT, msg=f"{kind} {layer}")
            assert_close(recomputed[kind, layer][rows], stored[kind, layer][rows], **EXACT, msg=f"{kind} {layer}")


@pytest.mark.parametrize("mode", ["lazy", "recompute"])
def test_reading_one_head_computes_only_that_head(monkeypatch, mode):
    model = tiny()
    ids = ids_of(1, 12)
    _, stored = model.run_with_cache(ids, names_filter=PATTERN_LIKE)
    _, lazy = model.run_with_cache(ids, names_filter=PATTERN_LIKE, patterns=mode)
    shapes = []
    original = torch.matmul
    monkeypatch.setattr(attention.torch, "matmul", lambda a, b: shapes.append((a.shape, b.shape)) or original(a, b))
    one = lazy.pattern(2, head=3, queries=slice(4, 9))
    monkeypatch.setattr(attention.torch, "matmul", original)
    assert shapes == [((1, 1, 5, 16), (1, 1, 16, 12))]  # one query head against its one kv head, 5 rows
    assert lazy.lazy.computed_heads == 1
    assert_close(one, stored["pattern", 2][:, 3, 4:9], **EXACT)
    assert_close(stored.pattern(2, head=3, queries=slice(4, 9)), one, **EXACT)
    assert_close(lazy.attn_scores(1, queries=-1), stored["attn_scores", 1][:, :, -1:], **EXACT)


def test_memory_estimate_knows_lazy_patterns_and_switches_with_a_warning():
    model = tiny()
    ids = ids_of(1, 40)
    names = model.resolve_hook_names(PATTERN_LIKE)
    stored = sum(capture_sizes(model, names, 1, 40, 40, torch.float32, "stored").values())
    lazy = sum(capture_sizes(model, names, 1, 40, 40, torch.float32, "lazy").values())
    assert stored == 3 * 2 * 4 * 40 * 40 * 4  # pattern + scores, 3 layers, [1, 4, 40, 40] float32
    assert lazy == 3 * (40 * 4 * 16 + 40 * 2 * 16) * 4  # rot_q [1, 40, 4, 16] + rot_k [1, 40, 2, 16]
    recompute = sum(capture_sizes(model, names, 1, 40, 40, torch.float32, "recompute").values())
    assert recompute == 3 * 40 * 64 * 4  # each layer's resid_pre [1, 40, 64]
    with pytest.warns(UserWarning, match="keeping them lazy"):
        _, cache = model.run_with_cache(ids, names_filter=PATTERN_LIKE, memory_budget=(stored + lazy) // 2)
    assert cache.lazy is not None and cache.lazy.nbytes == lazy
    with pytest.raises(MemoryError, match=r"patterns='lazy'.*biggest are hook_rot_q"):
        model.run_with_cache(ids, names_filter=PATTERN_LIKE, memory_budget=lazy // 2)


def test_lazy_cache_saves_moves_and_drops_the_batch_dim(tmp_path):
    model = tiny()
    ids = ids_of(1, 9)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, 0] = 0
    _, stored = model.run_with_cache(ids, names_filter=PATTERN_LIKE, attention_mask=attention_mask)
    _, lazy = model.run_with_cache(ids, names_filter=["blocks.1.attn.hook_pattern", "hook_logits"],
                                   attention_mask=attention_mask, patterns="lazy")
    loaded = ActivationCache.load(lazy.save(tmp_path / "lazy.safetensors"), model=model)
    assert set(loaded) == {"blocks.1.attn.hook_pattern", "hook_logits"}
    assert_close(loaded["pattern", 1], stored["pattern", 1], **EXACT)
    assert_close(lazy.to("cpu").remove_batch_dim()["pattern", 1], stored["pattern", 1][0], **EXACT)
    assert "blocks.1.attn.hook_pattern" in lazy and "blocks.0.attn.hook_pattern" not in lazy


def test_rot_q_and_rot_k_captured_by_name_are_shared_not_copied():
    model = tiny()
    names = ["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_rot_q", "blocks.0.attn.hook_rot_k"]
    _, cache = model.run_with_cache(ids_of(1, 7), names_filter=names, patterns="lazy")
    assert cache.lazy.pieces[0].q is cache["rot_q", 0] and cache.lazy.pieces[0].k is cache["rot_k", 0]


def test_bad_windows_heads_modes_and_missing_pieces_are_named():
    model = tiny()
    _, lazy = model.run_with_cache(ids_of(1, 6), names_filter="blocks.0.attn.hook_pattern", patterns="lazy")
    with pytest.raises(IndexError, match=r"query window 4:9 is outside the sequence of 6"):
        lazy.pattern(0, queries=slice(4, 9))
    with pytest.raises(IndexError, match=r"head 7 is out of range; accepted: 0..3"):
        lazy.pattern(0, head=7)
    with pytest.raises(TypeError, match="step 1"):
        lazy.pattern(0, queries=slice(0, 6, 2))
    with pytest.raises(KeyError, match=r"blocks.2.attn.hook_rot_q and blocks.2.attn.hook_rot_k"):
        lazy.pattern(2)
    with pytest.raises(ValueError, match=r"patterns='eager' is not supported; accepted: stored, lazy, recompute"):
        model.run_with_cache(ids_of(1, 6), patterns="eager")
    past = model(ids_of(1, 3), use_cache=True).past_key_values
    with pytest.raises(ValueError, match="patterns='recompute'.*past_key_values; use patterns='lazy'"):
        model.run_with_cache(ids_of(1, 2), names_filter=PATTERN_LIKE, patterns="recompute", past_key_values=past)
    with pytest.raises(ValueError, match="query window 3:9 is outside the 6 queries"):
        AttentionMask(6).rows(3, 9)
    with pytest.raises(ValueError, match="key_length"):
        AttentionMask(6, past_length=2, key_length=7)


def test_mask_object_rows_equal_the_builder_and_plain_masks_build_nothing():
    padding = torch.tensor([[0, 1, 1, 1, 1, 1, 1]])
    mask = AttentionMask(4, past_length=3, attention_mask=padding, sliding_window=3)
    full = attend_somewhere(build_mask(4, 7, 3, padding, 3))
    assert torch.equal(mask.dense(), full) and mask.dense() is mask.dense()
    assert torch.equal(mask.rows(1, 3), full[:, :, 1:3])
    plain = AttentionMask(5)
    assert plain.is_plain and plain.for_sdpa() is None and plain._dense is None
    assert not mask.is_plain and AttentionMask(1, past_length=4).is_plain


def test_lazy_equals_stored_on_the_default_model(default_gguf):
    from llamaviz.llama.lazy_patterns import LazyPatterns

    model, tok = llamaviz.load(default_gguf)
    ids = tok(["The quick brown fox jumps over the lazy dog, and the dog sleeps on."], return_tensors="pt")["input_ids"]
    layers = (0, 14, 29)
    names = [f"blocks.{layer}.attn.hook_{kind}" for layer in layers for kind in ("pattern", "attn_scores", "rot_q",
                                                                                  "rot_k")]
    _, stored = model.run_with_cache(ids, names_filter=names)
    _, lazy = model.run_with_cache(ids, names_filter=names, patterns="lazy")
    _, recomputed = model.run_with_cache(ids, names_filter=names, patterns="recompute")
    # from the very rot_q / rot_k of the stored run: the same arithmetic, so equal to 1e-6
    same_run = LazyPatterns({layer: (stored["rot_q", layer], stored["rot_k", layer]) for layer in layers},
                            AttentionMask(ids.shape[1]), model.config.head_dim ** -0.5, [])
    for layer in layers:
        assert_close(same_run.compute(layer), stored["pattern", layer], **EXACT)
        assert_close(lazy.pattern(layer, head=5), lazy["pattern", layer][:, 5], **EXACT)
        assert_close(recomputed.pattern(layer, head=5, queries=slice(3, 9)), lazy["pattern", layer][:, 5, 3:9], **EXACT)
        assert_close(recomputed["attn_scores", layer], lazy["attn_scores", layer], atol=1e-5, rtol=0)
        # a lazy run takes the fused path in every layer, so its residual stream drifts by float rounding
        assert_close(lazy["pattern", layer], stored["pattern", layer], atol=1e-5, rtol=0)


def test_progress_follows_the_prefill_layer_by_layer_and_not_the_decode_steps():
    from tiny import hf_and_ours

    _, model = hf_and_ours("gqa")
    ids = torch.randint(3, 113, (1, 6))
    seen = []
    model.run_with_cache(ids, names_filter="blocks.0.attn.hook_pattern", progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    seen.clear()
    model.generate_with_cache(ids, max_new_tokens=4, progress=lambda d, t: seen.append(d))
    assert seen == [1, 2, 3]  # the prompt's forward only
