"""Hook points, run_with_cache, ActivationCache and capture while generating."""

import pytest
import torch
from torch.testing import assert_close

from tiny import hf_and_ours

EXPECTED_SHAPES = {  # b=2, p=9, h=4, g=2, d=16, m=64, f=96, v=113
    "hook_embed": (2, 9, 64), "blocks.1.hook_resid_pre": (2, 9, 64), "blocks.1.ln1.hook_normalized": (2, 9, 64),
    "blocks.1.attn.hook_q": (2, 9, 4, 16), "blocks.1.attn.hook_k": (2, 9, 2, 16), "blocks.1.attn.hook_v": (2, 9, 2, 16),
    "blocks.1.attn.hook_rot_q": (2, 9, 4, 16), "blocks.1.attn.hook_rot_k": (2, 9, 2, 16),
    "blocks.1.attn.hook_attn_scores": (2, 4, 9, 9), "blocks.1.attn.hook_pattern": (2, 4, 9, 9),
    "blocks.1.attn.hook_z": (2, 9, 4, 16), "blocks.1.hook_attn_out": (2, 9, 64), "blocks.1.hook_resid_mid": (2, 9, 64),
    "blocks.1.ln2.hook_normalized": (2, 9, 64), "blocks.1.mlp.hook_in": (2, 9, 64), "blocks.1.mlp.hook_pre": (2, 9, 96),
    "blocks.1.mlp.hook_pre_linear": (2, 9, 96), "blocks.1.mlp.hook_post": (2, 9, 96),
    "blocks.1.hook_mlp_out": (2, 9, 64), "blocks.1.hook_resid_post": (2, 9, 64),
    "ln_final.hook_normalized": (2, 9, 64), "hook_logits": (2, 9, 113),
    "blocks.1.ln1.hook_scale": (2, 9, 1), "blocks.1.ln2.hook_scale": (2, 9, 1), "ln_final.hook_scale": (2, 9, 1),
    "blocks.1.hook_mlp_in": (2, 9, 64), "blocks.1.attn.hook_result": (2, 9, 4, 64),
}


@pytest.fixture(scope="module")
def pair():
    return hf_and_ours("gqa")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 113, (2, 9), generator=torch.Generator().manual_seed(1))


def test_every_design_hook_exists_with_its_shape(pair, ids):
    _, ours = pair
    assert len(ours.hook_points()) == 4 + 3 * 23
    logits, cache = ours.run_with_cache(ids, names_filter=lambda name: True)
    assert set(cache) == set(ours.hook_points())
    _, default = ours.run_with_cache(ids)  # per-head results only when asked for, as in TransformerLens
    assert set(default) == {n for n in ours.hook_points() if not n.endswith("hook_result")}
    for name, shape in EXPECTED_SHAPES.items():
        assert tuple(cache[name].shape) == shape, name
    assert_close(cache["hook_logits"], logits)
    assert cache["pattern", 1] is cache["blocks.1.attn.hook_pattern"]
    assert cache["resid_post", 2] is cache["blocks.2.hook_resid_post"]


def test_patterns_and_residuals_match_transformers(pair, ids):
    hf, ours = pair
    with torch.no_grad():
        ref = hf(ids, output_attentions=True, output_hidden_states=True)
    _, cache = ours.run_with_cache(ids)
    for layer in range(3):
        assert_close(cache["pattern", layer], ref.attentions[layer], atol=1e-5, rtol=0)
        assert_close(cache["resid_pre", layer], ref.hidden_states[layer], atol=1e-4, rtol=0)
    assert_close(cache["resid_post", 1], ref.hidden_states[2], atol=1e-4, rtol=0)
    assert_close(ours(ids, output_attentions=True).attentions[2], ref.attentions[2], atol=1e-5, rtol=0)


def test_hook_values_are_what_their_names_say(pair, ids):
    _, ours = pair
    _, cache = ours.run_with_cache(ids)
    attn = ours.model.layers[0].self_attn
    ln1 = ours.model.layers[0].input_layernorm
    assert_close(cache["blocks.0.ln1.hook_normalized"] * ln1.weight, ln1(cache["resid_pre", 0]))
    q = attn.q_proj(ln1(cache["resid_pre", 0])).view(2, 9, 4, 16)
    assert_close(cache["q", 0], q)
    scores = cache["attn_scores", 0]
    lowest = torch.finfo(scores.dtype).min
    assert (scores[0, 0, 0, 1:] == lowest).all() and (scores[0, 0, -1] > lowest).all()
    assert_close(torch.softmax(scores, -1), cache["pattern", 0])
    mlp = ours.model.layers[0].mlp
    assert_close(cache["blocks.0.mlp.hook_post"], torch.nn.functional.silu(cache["pre", 0]) * cache["pre_linear", 0])
    assert_close(mlp.down_proj(cache["post", 0]), cache["mlp_out", 0])
    assert_close(cache["resid_mid", 0], cache["resid_pre", 0] + cache["attn_out", 0])


def test_patterns_are_computed_only_for_requested_layers(pair, ids, monkeypatch):
    from llamaviz.llama import attention

    calls = []
    original = attention.eager_attention
    monkeypatch.setattr(attention, "eager_attention", lambda *a: calls.append(1) or original(*a))
    _, ours = pair
    ours.run_with_cache(ids, names_filter="blocks.1.attn.hook_pattern")
    assert len(calls) == 1
    ours(ids)
    assert len(calls) == 1


def test_zero_ablating_a_head_matches_transformers_with_o_proj_columns_zeroed(pair, ids):
    from llamaviz.interpret.interventions import ablate_heads

    hf, ours = pair
    layer, head, d = 1, 2, 16
    with torch.no_grad():
        ablated = ours.run_with_hooks(ids, fwd_hooks=ablate_heads([(layer, head)], model=ours))
        weight = hf.model.layers[layer].self_attn.o_proj.weight
        saved = weight[:, head * d:(head + 1) * d].clone()
        weight[:, head * d:(head + 1) * d] = 0
        try:
            ref = hf(ids).logits
        finally:
            weight[:, head * d:(head + 1) * d] = saved
    assert_close(ablated, ref, atol=1e-4, rtol=0)
    assert not torch.allclose(ablated, ours(ids).logits, atol=1e-4)


def test_mean_ablation_patching_and_steering(pair, ids):
    from llamaviz.interpret.interventions import ablate_heads, patch_activation, steer

    _, ours = pair
    _, clean = ours.run_with_cache(ids[:1])
    other = torch.randint(3, 113, (1, 9), generator=torch.Generator().manual_seed(5))
    patched = ours.run_with_hooks(other, fwd_hooks=patch_activation("blocks.0.hook_resid_pre", clean))
    assert_close(patched, ours(ids[:1]).logits, atol=1e-5, rtol=0)
    with ours.hooks(fwd_hooks=patch_activation("blocks.2.hook_resid_post", clean, positions=[8])):
        partial = ours(other).logits
    assert_close(partial[0, 8], clean["hook_logits"][0, 8], atol=1e-5, rtol=0)
    assert_close(partial[0, :8], ours(other).logits[0, :8])
    vector = torch.randn(64)
    _, steered = ours.run_with_cache(ids, names_filter="blocks.0.hook_resid_post")
    with ours.hooks(fwd_hooks=steer(0, vector, scale=2.0)):
        _, after = ours.run_with_cache(ids, names_filter="blocks.0.hook_resid_post")
    assert_close(after["resid_post", 0], steered["resid_post", 0] + 2.0 * vector)
    _, ref = ours.run_with_cache(ids, names_filter="blocks.1.attn.hook_z")
    with ours.hooks(fwd_hooks=ablate_heads({1: [0]}, mode="mean", mean_cache=ref)):
        _, mean_run = ours.run_with_cache(ids, names_filter="blocks.1.attn.hook_z")
    assert_close(mean_run["z", 1][:, :, 0], ref["z", 1][:, :, 0].mean((0, 1)).expand(2, 9, 16))


def test_a_raising_hook_leaves_nothing_behind(pair, ids):
    _, ours = pair

    def broken(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ours.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_pre", broken)])
    assert not any(point.active for point in ours.hook_points().values())
    with pytest.raises(RuntimeError):
        with ours.hooks(fwd_hooks=[(lambda n: n.endswith("hook_z"), lambda x, h: None)]):
            raise RuntimeError("inside")
    assert not any(point.active for point in ours.hook_points().values())


def test_gradients_reach_hook_embed_through_backward_hooks(pair, ids):
    _, ours = pair
    grads = {}
    out = ours.run_with_hooks(ids, bwd_hooks=[("hook_embed", lambda g, hook: grads.setdefault(hook.name, g))])
    out[0, -1, 5].backward()
    assert grads["hook_embed"].shape == (2, 9, 64) and grads["hook_embed"][0].abs().sum() > 0
    assert grads["hook_embed"][1].abs().sum() == 0
    ours.zero_grad()


def test_bad_hook_usage_gets_clear_errors(pair, ids):
    _, ours = pair
    with pytest.raises(KeyError, match=r"unknown hook point 'blocks.0.attn.hook_patern'.*blocks.0.attn.hook_pattern"):
        ours.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_patern", lambda x, h: None)])
    with pytest.raises(ValueError, match=r"hook on blocks.0.hook_resid_pre returned \(2, 9, 3\).*\(2, 9, 64\)"):
        ours.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, h: x[..., :3])])
    with pytest.raises(ValueError, match="matched no hook point"):
        ours.run_with_cache(ids, names_filter=lambda name: name.endswith("hook_nothing"))
    with pytest.raises(MemoryError, match=r"needs about .* MiB.*names_filter"):
        ours.run_with_cache(ids, memory_budget=1000)
    assert not any(point.active for point in ours.hook_points().values())


def test_cache_save_load_round_trip_and_model_check(pair, ids, tmp_path):
    from llamaviz import ActivationCache

    _, ours = pair
    _, cache = ours.run_with_cache(ids, names_filter=lambda n: "blocks.0." in n)
    path = cache.save(tmp_path / "cache.safetensors")
    loaded = ActivationCache.load(path, model=ours)
    assert set(loaded) == set(cache) and torch.equal(loaded.tokens, ids)
    for name in cache:
        assert torch.equal(loaded[name], cache[name])
    _, other = hf_and_ours("default")
    with pytest.raises(ValueError, match="captured from model"):
        ActivationCache.load(path, model=other)
    with pytest.raises(TypeError):
        cache["x"] = 1


def test_logit_lens_accumulated_resid_and_head_attribution(pair, ids):
    _, ours = pair
    logits, cache = ours.run_with_cache(ids)
    resid = cache.accumulated_resid()
    assert resid.shape == (4, 2, 9, 64)
    lens = cache.logit_lens(top_k=3, targets=ids)
    assert lens["top_ids"].shape == (4, 2, 9, 3)
    assert torch.equal(lens["top_ids"][-1, ..., 0], logits.argmax(-1))
    assert_close(lens["target_probs"][-1], logits.softmax(-1).gather(-1, ids[..., None])[..., 0])
    token = 7
    attribution = cache.head_logit_attribution(token)  # [b, layers, heads]
    assert attribution.shape == (2, 3, 4)
    final = cache["resid_post", 2][:, -1]
    scale = torch.rsqrt(final.pow(2).mean(-1, keepdim=True) + ours.config.rms_norm_eps)
    direction = ours.lm_head.weight[token] * ours.model.norm.weight
    for layer in range(3):  # heads add up to the layer's attention output (no o_proj bias here)
        total = (cache["attn_out", layer][:, -1] * scale) @ direction
        assert_close(attribution[:, layer].sum(-1), total, atol=1e-4, rtol=0)


def test_generate_with_cache_equals_run_with_cache_of_the_sequence(pair):
    _, ours = pair
    prompt = torch.randint(3, 113, (2, 5), generator=torch.Generator().manual_seed(3))
    sequences, cache = ours.generate_with_cache(prompt, max_new_tokens=6, eos_token_id=[])
    assert sequences.shape == (2, 11)
    _, reference = ours.run_with_cache(sequences[:, :-1])
    assert set(cache) == set(reference)
    for name in reference:
        assert cache[name].shape == reference[name].shape, name
        assert_close(cache[name], reference[name], atol=1e-5, rtol=0, msg=name)
    with pytest.raises(MemoryError, match="MiB"):
        ours.generate_with_cache(prompt, max_new_tokens=6, memory_budget=10)


def test_the_pattern_reuses_the_scores_memory_unless_the_scores_are_held(pair, ids):
    """Softmax in place over scores nobody holds (same bits as a fresh softmax); captured scores stay scores."""
    _, ours = pair
    with torch.no_grad():
        _, both = ours.run_with_cache(ids, names_filter=["blocks.1.attn.hook_attn_scores", "blocks.1.attn.hook_pattern"])
        _, alone = ours.run_with_cache(ids, names_filter=["blocks.1.attn.hook_pattern"])
    scores, pattern = both["blocks.1.attn.hook_attn_scores"], both["blocks.1.attn.hook_pattern"]
    assert scores.data_ptr() != pattern.data_ptr() and (scores < 0).any()
    assert torch.equal(torch.softmax(scores, dim=-1, dtype=torch.float32), pattern)
    assert torch.equal(alone["blocks.1.attn.hook_pattern"], pattern)
