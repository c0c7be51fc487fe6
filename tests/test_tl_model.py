"""TransformerLens' model API on LlamaForCausalLM: tokens, weights, forward controls, hooks."""

import pytest
import torch
from torch.testing import assert_close

import llamaviz
from tiny import hf_and_ours
from tl_reference import bridge


@pytest.fixture(scope="module")
def setup():
    hf, ours = hf_and_ours("bias", num_key_value_heads=2, hf_attn="eager")
    return hf, ours, bridge(hf)


def test_weight_views_have_transformer_lens_shapes_and_values(setup):
    hf, ours, tl = setup
    for name, shape in {"W_E": (113, 64), "W_U": (64, 113), "W_Q": (3, 4, 64, 16), "W_K": (3, 4, 64, 16),
                        "W_V": (3, 4, 64, 16), "W_O": (3, 4, 16, 64), "W_in": (3, 64, 96), "W_gate": (3, 64, 96),
                        "W_out": (3, 96, 64), "b_Q": (3, 4, 16), "b_K": (3, 4, 16), "b_V": (3, 4, 16), "b_O": (3, 64),
                        "b_in": (3, 96), "b_out": (3, 64)}.items():
        mine = getattr(ours, name)
        assert tuple(mine.shape) == shape and not mine.requires_grad, name
        ref = getattr(tl, name).to(mine.dtype)
        if name in ("W_K", "W_V", "b_K", "b_V"):  # the bridge keeps kv heads; HookedTransformer repeated them
            ref = ref.repeat_interleave(2, dim=1)
        assert_close(mine, ref, atol=1e-6, rtol=0, msg=name)
    ov = ours.OV[1, 2]
    assert_close(ov.AB, ours.W_V[1, 2] @ ours.W_O[1, 2], atol=1e-6, rtol=0)
    u, s, v = ov.svd()
    assert_close(u @ torch.diag(s) @ v.T, ov.AB, atol=1e-5, rtol=0)
    assert_close(ov.norm(), ov.AB.norm(), atol=1e-5, rtol=0)
    top = ov.eigenvalues.abs().sort(descending=True).values[:4]
    assert_close(top, torch.linalg.eigvals(ov.AB).abs().sort(descending=True).values[:4], atol=1e-5, rtol=1e-4)
    assert_close((ours.QK @ torch.ones(64))[0, 0], ours.QK.AB[0, 0] @ torch.ones(64), atol=1e-5, rtol=0)
    _, plain = hf_and_ours("gqa")
    with pytest.raises(AttributeError, match="b_Q"):  # no attention bias in this config
        plain.b_Q


def test_forward_controls_and_return_types(setup):
    hf, ours, _ = setup
    ids = torch.randint(3, 113, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = ours(ids, return_type="logits")
        assert_close(logits, hf(ids).logits, atol=1e-4, rtol=0)
        assert ours(ids, return_type=None) is None
        loss = ours(ids, return_type="loss")
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        assert_close(loss, expected, atol=1e-5, rtol=0)
        per_token = ours(ids, return_type="loss", loss_per_token=True)
        assert per_token.shape == (2, 6) and torch.allclose(per_token.mean(), loss)
        both = ours(ids, return_type="both")
        assert_close(both[0], logits) and assert_close(both[1], loss)
        resid = ours(ids, stop_at_layer=2)
        _, cache = ours.run_with_cache(ids)
        assert_close(resid, cache["resid_pre", 2], atol=1e-6, rtol=0)
        assert_close(ours(ids, stop_at_layer=-1), resid)
        assert_close(ours(cache["resid_pre", 1], start_at_layer=1, return_type="logits"), logits, atol=1e-5, rtol=0)
        assert_close(ours(resid, start_at_layer=2, tokens=ids, return_type="loss"), loss, atol=1e-5, rtol=0)
        _, early = ours.run_with_cache(ids, stop_at_layer=1)
        assert "blocks.0.hook_resid_post" in early and "blocks.1.hook_resid_pre" not in early
    assert isinstance(ours(ids), llamaviz.llama.outputs.CausalLMOutput)  # transformers' default stays


def test_unknown_keywords_and_bad_controls_are_refused(setup):
    _, ours, _ = setup
    ids = torch.randint(3, 113, (1, 5))
    for keyword in ("remove_batch_dims", "prepend_boss", "return_typ"):
        with pytest.raises(TypeError, match=keyword):
            ours(ids, **{keyword: True})
    with pytest.raises(TypeError, match="stop_at_eoss"):
        ours.generate(ids, max_new_tokens=2, stop_at_eoss=False)
    with pytest.raises(ValueError, match=r"stop_at_layer=4 is out of range for a model of 3 layers; accepted: an "
                                         r"integer from -3 to 3"):
        ours(ids, stop_at_layer=4)
    with pytest.raises(ValueError, match="return_type 'probs'"):
        ours(ids, return_type="probs")
    with pytest.raises(ValueError, match="residual stream"):
        ours(ids, start_at_layer=1)
    with pytest.raises(ValueError, match="batch of one"):
        ours.run_with_cache(torch.randint(3, 113, (2, 5)), remove_batch_dim=True)


def test_permanent_hooks_layer_and_remove_batch_dim(setup):
    _, ours, _ = setup
    ids = torch.randint(3, 113, (1, 5))
    seen = []
    point = ours.hook_points()["blocks.2.attn.hook_z"]
    assert point.layer() == 2
    point.add_hook(lambda x, hook: seen.append(hook.layer()))
    ours(ids)
    ours(ids)
    assert seen == [2, 2]
    ours.reset_hooks()
    ours(ids)
    assert seen == [2, 2] and not point.active
    with pytest.raises(ValueError, match="belongs to no layer"):
        ours.hook_points()["hook_embed"].layer()
    with pytest.raises(ValueError, match="direction 'forward'"):
        point.add_hook(lambda x, h: None, dir="forward")
    logits, cache = ours.run_with_cache(ids, remove_batch_dim=True)
    assert cache["resid_pre", 0].shape == (5, 64) and logits.shape == (1, 5, 113)


def test_head_results_hook_is_each_heads_write_and_patchable(setup):
    hf, ours, _ = setup
    ids = torch.randint(3, 113, (2, 6))
    _, cache = ours.run_with_cache(ids, names_filter=["blocks.1.attn.hook_result", "blocks.1.hook_attn_out"])
    bias = ours.model.layers[1].self_attn.o_proj.bias
    assert_close(cache["result", 1].sum(2) + bias, cache["attn_out", 1], atol=1e-5, rtol=0)
    zero_head = lambda x, hook: torch.cat([x[:, :, :1] * 0, x[:, :, 1:]], dim=2)  # noqa: E731
    ablated = ours.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_result", zero_head)])
    by_z = ours.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z",
                                                lambda z, hook: torch.cat([z[:, :, :1] * 0, z[:, :, 1:]], 2))])
    assert_close(ablated, by_z, atol=1e-5, rtol=0)


def test_frozen_scale_hook_reproduces_the_norm(setup):
    _, ours, _ = setup
    ids = torch.randint(3, 113, (1, 6))
    _, cache = ours.run_with_cache(ids)
    x = cache["resid_pre", 1]
    assert_close(cache["scale", 1, "ln1"], (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt(), atol=1e-6, rtol=0)
    assert_close(x / cache["scale", 1, "ln1"], cache["blocks.1.ln1.hook_normalized"], atol=1e-6, rtol=0)
    assert_close(cache["normalized", None], cache["ln_final.hook_normalized"])
    assert llamaviz.get_act_name("scale", 1, "ln1") == "blocks.1.ln1.hook_scale"
    assert llamaviz.get_act_name("attn", 2) == "blocks.2.attn.hook_pattern"
    assert llamaviz.get_act_name("pattern3") == "blocks.3.attn.hook_pattern"
    assert llamaviz.get_act_name("mlp_in", 0) == "blocks.0.hook_mlp_in"
    with pytest.raises(KeyError, match="unknown activation name 'patern'"):
        llamaviz.get_act_name("patern", 1)


@pytest.mark.slow
def test_tokens_on_the_default_model_match_transformer_lens(default_with_reference, capsys):
    model, tok, _, tl = default_with_reference
    prompts = ["When John and Mary went to the shops, John gave the bag to", "Hi there"]
    for prepend_bos in (True, False):
        assert model.to_tokens(prompts[0], prepend_bos=prepend_bos).tolist() == \
            tl.to_tokens(prompts[0], prepend_bos=prepend_bos).tolist()
    assert model.to_str_tokens(prompts[0], prepend_bos=False) == tl.to_str_tokens(prompts[0], prepend_bos=False)
    assert model.to_str_tokens(prompts[0], prepend_bos=False)[1] == " John"
    assert model.to_single_token(" Mary") == tl.to_single_token(" Mary")
    assert model.get_token_position(" John", prompts[0], mode="last") == 9
    assert model.to_string(model.to_tokens(prompts[0])[0]) == prompts[0]
    batch = model.to_tokens(prompts, padding_side="right")
    assert batch.shape == (2, 14) and batch[1, 2:].eq(tok.pad_token_id).all()
    with pytest.raises(ValueError, match=r"' photosynthesise' is \d tokens, not one: \["):
        model.to_single_token(" photosynthesise")
    with torch.no_grad():
        assert_close(model(prompts[0], return_type="logits", prepend_bos=True), tl(prompts[0], return_type="logits"),
                     atol=1e-3, rtol=0)
    ranks = llamaviz.test_prompt(prompts[0], "Mary", model, top_k=3)
    out = capsys.readouterr().out
    assert ranks == [(" Mary", 0)] and "Rank: 0" in out and "Top 2th token" in out
    assert model.generate(prompts[0], max_new_tokens=2).startswith(prompts[0] + " Mary")
