"""The static KV cache generates exactly what the dynamic one does; compile=True runs its steps compiled."""

import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "llama"))
from tiny import hf_and_ours  # noqa: E402


def left_padded(batch: int = 3, length: int = 9, pads=(4, 0, 2)):
    ids = torch.randint(3, 113, (batch, length))
    mask = torch.ones_like(ids)
    for row, count in enumerate(pads[:batch]):
        ids[row, :count], mask[row, :count] = 0, 0
    return ids, mask


@pytest.mark.parametrize("variant", ["default", "gqa", "mqa_head_dim", "bias", "tied", "llama3_rope"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_static_equals_dynamic_greedy_on_a_padded_batch(variant, attn):
    _, ours = hf_and_ours(variant, attn_implementation=attn)
    ids, mask = left_padded()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    dynamic = ours.generate(ids, **kwargs)
    static = ours.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(static, dynamic)


def test_static_equals_dynamic_without_mask_and_with_early_eos():
    _, ours = hf_and_ours("gqa")
    ids = torch.randint(3, 113, (2, 5))
    dynamic = ours.generate(ids, max_new_tokens=15)
    eos = int(dynamic[0, 8])  # a token the first row really produces: generation may end early
    dynamic = ours.generate(ids, max_new_tokens=15, eos_token_id=eos)
    assert torch.equal(ours.generate(ids, max_new_tokens=15, eos_token_id=eos, cache_implementation="static"), dynamic)


def test_static_cache_holds_prompt_plus_new_tokens_and_reports_full_buffers():
    from llamaviz.llama.cache import StaticCache

    _, ours = hf_and_ours("gqa")
    cfg = ours.config
    cache = StaticCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, 10, ours.dtype, "cpu")
    ids = torch.randint(3, 113, (1, 10))
    with torch.no_grad():
        full = ours(ids).logits
        first = ours(ids[:, :6], past_key_values=cache, use_cache=True).logits
        steps = [ours(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits for i in range(6, 10)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, atol=1e-5, rtol=0)
    assert cache.keys[0].shape == (1, 2, 10, 16) and cache.get_seq_length() == 10
    with pytest.raises(ValueError, match="static cache holds 10 positions|must cover past_length"):
        ours(ids[:, :1], past_key_values=cache, use_cache=True)


def test_static_equals_dynamic_on_the_default_model(default_gguf):
    import llamaviz

    model, tokenizer = llamaviz.load(default_gguf, dtype=torch.float32)
    batch = tokenizer(["Plants create energy through a process known as", "The capital of France is"],
                      return_tensors="pt", padding=True)
    assert int(batch["attention_mask"][1, 0]) == 0  # left padding in the shorter row
    kwargs = dict(attention_mask=batch["attention_mask"], max_new_tokens=10)
    dynamic = model.generate(batch["input_ids"], **kwargs)
    assert torch.equal(model.generate(batch["input_ids"], cache_implementation="static", **kwargs), dynamic)


def test_compile_needs_the_static_cache():
    _, ours = hf_and_ours()
    with pytest.raises(ValueError, match="compile=True needs cache_implementation='static'"):
        ours.generate(torch.randint(3, 113, (1, 4)), cache_implementation="dynamic", compile=True)


needs_compiler = pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")),
    reason="torch.compile on CPU needs a C++ compiler (g++/clang++), none on PATH")


@pytest.fixture
def counters():
    """dynamo's counters, starting from a fresh dynamo state."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    return counters


@needs_compiler
def test_compiled_decode_matches_dynamic_and_compiles_once(counters):
    """Slow-ish (one inductor compile, ~20-40 s on 2 cores): compiled steps give the dynamic cache's tokens."""
    _, ours = hf_and_ours("gqa")
    ids, mask = left_padded(batch=2)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    dynamic = ours.generate(ids, **kwargs)
    started = time.perf_counter()
    compiled = ours.generate(ids, compile=True, **kwargs)
    assert torch.equal(compiled, dynamic)
    assert counters["stats"]["unique_graphs"] >= 1  # the steps really ran through dynamo
    with torch._dynamo.config.patch(error_on_recompile=True):  # later steps, prompts and lengths reuse the graph
        longer_ids, longer_mask = left_padded(batch=2, length=13)
        longer = dict(attention_mask=longer_mask, max_new_tokens=7, eos_token_id=[])
        assert torch.equal(ours.generate(longer_ids, compile=True, **longer), ours.generate(longer_ids, **longer))
    print(f"\ncompile + 2 generations: {time.perf_counter() - started:.1f} s")


@needs_compiler
def test_compiled_decode_of_an_int4_model_has_no_graph_breaks(counters):
    from llamaviz.llama.quantize import quantize_model

    _, ours = hf_and_ours("gqa")
    quantize_model(ours, "int4")
    ids = torch.randint(3, 113, (1, 6))
    expected = ours.generate(ids, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(ours.generate(ids, max_new_tokens=6, eos_token_id=[], compile=True), expected)
    assert not counters["graph_break"], dict(counters["graph_break"])
