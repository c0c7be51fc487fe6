"""The residual stream taken apart: TransformerLens' ActivationCache methods, against TransformerLens itself."""

import pytest
import torch
from torch.testing import assert_close

from tiny import hf_and_ours
from tl_reference import bridge

TOL = dict(atol=1e-4, rtol=0)


@pytest.fixture(scope="module", params=["gqa", "bias"])
def setup(request):
    hf, ours = hf_and_ours(request.param, hf_attn="eager")
    tokens = torch.randint(3, 113, (2, 8), generator=torch.Generator().manual_seed(2))
    tl = bridge(hf)
    _, theirs = tl.run_with_cache(tokens)
    _, cache = ours.run_with_cache(tokens)
    return ours, tl, tokens, cache, theirs


def test_decompositions_equal_transformer_lens(setup):
    ours, tl, tokens, cache, theirs = setup
    for kwargs in ({}, {"layer": 2, "mode": "attn"}, {"pos_slice": -1, "apply_ln": True}, {"incl_embeds": False},
                   {"layer": 1, "mlp_input": True, "apply_ln": True}):
        mine, labels = cache.decompose_resid(return_labels=True, **kwargs)
        ref, ref_labels = theirs.decompose_resid(return_labels=True, **kwargs)
        assert labels == ref_labels, kwargs
        assert_close(mine, ref, **TOL)
    for kwargs in ({}, {"incl_mid": True}, {"apply_ln": True, "pos_slice": -1}, {"layer": 2, "mlp_input": True,
                                                                                 "apply_ln": True}):
        mine, labels = cache.accumulated_resid(return_labels=True, **kwargs)
        ref, ref_labels = theirs.accumulated_resid(return_labels=True, **kwargs)
        assert labels == ref_labels, kwargs
        assert_close(mine, ref, **TOL)


def test_head_results_equal_transformer_lens_and_count_the_bias_once(setup):
    ours, tl, tokens, cache, theirs = setup
    for kwargs in ({}, {"pos_slice": -1, "apply_ln": True}, {"layer": 2, "incl_remainder": True}):
        mine, labels = cache.stack_head_results(return_labels=True, **kwargs)
        ref, ref_labels = theirs.stack_head_results(return_labels=True, **kwargs)
        assert labels == ref_labels and labels[:2] == ["L0H0", "L0H1"]
        assert_close(mine, ref, **TOL)
    # the heads of a layer and its o_proj bias (once) add up to the attention output
    heads = cache.stack_head_results(layer=3).view(3, 4, 2, 8, 64)
    bias = ours.model.layers[1].self_attn.o_proj.bias
    assert_close(heads[1].sum(0) + (bias if bias is not None else 0), cache["attn_out", 1], **TOL)


def test_full_decomposition_sums_to_the_last_residual(setup):
    ours, tl, tokens, cache, theirs = setup
    for expand in (True, False):
        stack, labels = cache.get_full_resid_decomposition(expand_neurons=expand, return_labels=True)
        assert_close(stack.sum(0), cache["resid_post", -1], **TOL)
        assert labels[-2:] == ["embed", "bias"] and ("L2N95" in labels) == expand
    assert_close(cache.decompose_resid().sum(0), cache["resid_post", -1], **TOL)
    neurons = cache.stack_neuron_results(layer=1, return_labels=True)
    ref = theirs.stack_neuron_results(layer=1, return_labels=True)
    assert neurons[1] == ref[1]
    assert_close(neurons[0], ref[0], **TOL)


def test_logit_attrs_equal_transformer_lens_with_the_final_norm_folded(setup):
    ours, tl, tokens, cache, theirs = setup
    folded = bridge(tl.original_model, fold_ln=True)  # TransformerLens' convention for direct logit attribution
    _, folded_cache = folded.run_with_cache(tokens)
    answer, wrong = torch.tensor([5, 7]), torch.tensor([9, 11])
    stack = cache.decompose_resid(pos_slice=-1)
    ref_stack = folded_cache.decompose_resid(pos_slice=-1)
    mine = cache.logit_attrs(stack, answer, wrong, pos_slice=-1)
    assert_close(mine, folded_cache.logit_attrs(ref_stack, answer, wrong, pos_slice=-1), **TOL)
    # per head: TransformerLens' (unfolded) head results through its frozen final scale, on its folded W_U
    # (its folded bridge's own W_O differs from the checkpoint's, so its folded head results do not add up)
    heads = cache.stack_head_results(pos_slice=-1)
    ref_heads = theirs.apply_ln_to_stack(theirs.stack_head_results(pos_slice=-1), -1, pos_slice=-1)
    expected_heads = (ref_heads * folded.tokens_to_residual_directions(answer)).sum(-1)
    assert_close(cache.logit_attrs(heads, answer, pos_slice=-1), expected_heads, **TOL)
    # the whole decomposition's attributions are the logit differences themselves
    logits = ours(tokens, return_type="logits")[:, -1]
    expected = logits.gather(-1, answer[:, None])[:, 0] - logits.gather(-1, wrong[:, None])[:, 0]
    full = cache.get_full_resid_decomposition(pos_slice=-1, expand_neurons=False)
    assert_close(cache.logit_attrs(full, answer, wrong, pos_slice=-1).sum(0), expected, **TOL)


def test_short_names_negative_layers_and_stacks(setup):
    ours, tl, tokens, cache, theirs = setup
    assert cache["attn", 1] is cache["blocks.1.attn.hook_pattern"]
    assert cache["scale", 2, "ln1"] is cache["blocks.2.ln1.hook_scale"]
    assert cache["scale"] is cache["ln_final.hook_scale"]
    assert cache["resid_post", -1] is cache["blocks.2.hook_resid_post"]
    assert_close(cache["scale", 1, "ln2"], theirs["scale", 1, "ln2"], **TOL)
    assert cache.stack_activation("pattern").shape == (3, 2, 4, 8, 8)
    assert_close(cache.stack_activation("z", layer=2), theirs.stack_activation("z", layer=2), **TOL)
    one = cache.apply_slice_to_batch_dim(1)
    assert one["resid_pre", 0].shape == (8, 64) and one.tokens.tolist() == tokens[1].tolist()


def test_bad_inputs_name_what_is_wrong(setup):
    ours, tl, tokens, cache, theirs = setup
    _, partial = ours.run_with_cache(tokens, names_filter=lambda n: "scale" not in n)
    with pytest.raises(KeyError, match="ln_final.hook_scale"):
        partial.decompose_resid(apply_ln=True)
    with pytest.raises(ValueError, match="selects nothing"):
        cache.decompose_resid(pos_slice=slice(20, 30))
    with pytest.raises(ValueError, match=r"layer 7 is out of range: accepted 0\.\.3"):
        cache.decompose_resid(layer=7)
    with pytest.raises(KeyError, match=r"layer 5 is out of range for 3 layers"):
        cache["pattern", 5]
    with pytest.raises(ValueError, match="mode 'heads'"):
        cache.decompose_resid(mode="heads")
