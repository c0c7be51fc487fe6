"""llamaviz.interpret.readouts and llamaviz.interpret.pairs on tiny random configs, against brute-force computations from the
model's own logits and hand-written hooks."""

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from llamaviz import pairs, readouts
from tiny import hf_and_ours


@pytest.fixture(scope="module")
def tiny():
    """(model, tokens [1, 7], logits [1, 7, v], cache with everything the explanations read)."""
    _, ours = hf_and_ours("gqa")
    tokens = torch.randint(3, 113, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, cache = ours.run_with_cache(tokens, names_filter=readouts.explain_filter)
    return ours, tokens, logits, cache


def final_scale_logits(model, resid: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Logits of a residual [.., m] divided by a given rms scale [.., 1] (TransformerLens' frozen scale)."""
    return model.lm_head(resid / scale * model.model.norm.weight)


def test_direct_logit_attribution_adds_up_to_the_model_logit_difference(tiny):
    model, tokens, logits, cache = tiny
    position, token, foil = 4, 17, 30
    dla = readouts.direct_logit_attribution(cache, position, token, foil)
    expected = logits[0, position, token] - logits[0, position, foil]
    assert_close(dla.components.sum(), expected.float(), atol=1e-4, rtol=1e-4)
    assert dla.total == pytest.approx(float(expected), abs=1e-4)
    assert dla.labels[:3] == ["embed", "L0 attn", "L0 mlp"] and len(dla.labels) == 1 + 2 * 3
    # the heads of a layer add up to its attention output (no o_proj bias), component by component
    attn = dla.components[1::2]
    assert_close(dla.heads.sum(-1), attn, atol=1e-4, rtol=1e-4)


def test_accumulated_rows_are_each_residual_through_the_final_scale(tiny):
    model, tokens, logits, cache = tiny
    position, token = 2, 8
    dla = readouts.direct_logit_attribution(cache, position, token)
    scale = cache["ln_final.hook_scale"][0, position]  # [1]
    with torch.no_grad():
        for row, name in enumerate(readouts.resid_names(3)):
            expected = final_scale_logits(model, cache[name][0, position], scale)[token]
            assert_close(dla.accumulated[row], expected.float(), atol=1e-4, rtol=1e-4)
    assert dla.accumulated_labels == ["embed", "L0", "L1", "L2"]


def test_lens_logit_diff_ends_at_the_model_logit_difference_everywhere(tiny):
    model, tokens, logits, cache = tiny
    lens = readouts.lens_logit_diff(cache, 5, 9)  # [L+1, p]
    assert lens.shape == (4, 7)
    assert_close(lens[-1], (logits[0, :, 5] - logits[0, :, 9]).float(), atol=1e-4, rtol=1e-4)


def test_bad_position_is_named(tiny):
    with pytest.raises(ValueError, match="out of range for 7 cached positions"):
        readouts.direct_logit_attribution(tiny[3], 7, 1)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_token_logprobs_match_log_softmax_whatever_the_chunking(tiny, chunk):
    model, tokens, logits, cache = tiny
    final = cache["blocks.2.hook_resid_post"][0, :-1]  # [p-1, m]
    table = readouts.token_logprobs(readouts.final_logits(model, final, chunk), tokens[0], top_k=3)
    logprobs = torch.log_softmax(logits[0, :-1].float(), -1)
    assert torch.isnan(table.chosen[0])
    assert_close(table.chosen[1:], logprobs.gather(-1, tokens[0, 1:, None])[:, 0], atol=1e-5, rtol=1e-5)
    top = logprobs.exp().topk(3, dim=-1)
    assert_close(table.top_probs, top.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(table.top_ids, top.indices)


def test_resid_norms_and_labels(tiny):
    cache = tiny[3]
    norms = readouts.resid_norms(cache)
    assert_close(norms[0], cache["blocks.0.hook_resid_pre"][0].norm(dim=-1))
    assert_close(norms[-1], cache["blocks.2.hook_resid_post"][0].norm(dim=-1))
    assert readouts.norm_labels(2) == ["embed", "after L0", "after L1"]


# ---------------------------------------------------------------- pairs


@pytest.fixture(scope="module")
def pair(tiny):
    model, tokens = tiny[0], tiny[1]
    corrupted = tokens.clone()
    corrupted[0, 2] = 7
    result = pairs.patch_pair(model, tokens, corrupted, 5, 9)
    return model, tokens, corrupted, result


def brute_force_patch(model, clean, corrupted, name: str, position: int | None, head: int | None = None) -> float:
    """The logit difference of the corrupted run with one activation (one position, or one head) from the clean."""
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=[name])

    def hook(x, hook):
        x = x.clone()
        if head is None:
            x[:, position] = cache[name][:, position]
        else:
            x[:, :, head] = cache[name][:, :, head]
        return x

    with torch.no_grad(), model.hooks(fwd_hooks=[(name, hook)]):
        logits = model(corrupted).logits
    return float(logits[0, -1, 5] - logits[0, -1, 9])


def test_patch_pair_normalises_brute_force_patching(pair):
    model, clean, corrupted, result = pair
    with torch.no_grad():
        clean_logits, bad_logits = model(clean).logits, model(corrupted).logits
    assert result.clean_diff == pytest.approx(float(clean_logits[0, -1, 5] - clean_logits[0, -1, 9]), abs=1e-5)
    assert result.corrupted_diff == pytest.approx(float(bad_logits[0, -1, 5] - bad_logits[0, -1, 9]), abs=1e-5)
    gap = result.clean_diff - result.corrupted_diff
    for name, key, layer, position, head in [("blocks.1.hook_resid_pre", "resid_pre", 1, 2, None),
                                             ("blocks.0.hook_mlp_out", "mlp_out", 0, 6, None),
                                             ("blocks.2.hook_attn_out", "attn_out", 2, 6, None),
                                             ("blocks.1.attn.hook_z", "heads", 1, None, 3)]:
        expected = (brute_force_patch(model, clean, corrupted, name, position, head) - result.corrupted_diff) / gap
        cell = (layer, head) if key == "heads" else (layer, position)
        assert float(result.exact[key][cell]) == pytest.approx(expected, abs=1e-4), key
    assert result.exact["resid_pre"].shape == (3, 7) and result.exact["heads"].shape == (3, 4)
    assert set(result.attribution) == set(pairs.SWEEPS)


def test_correlation_is_pearson_of_the_exact_and_attribution_maps(pair):
    result = pair[3]
    for name in pairs.SWEEPS:
        expected = np.corrcoef(result.exact[name].flatten().numpy(), result.attribution[name].flatten().numpy())[0, 1]
        assert result.correlation(name) == pytest.approx(expected, abs=1e-6)


def test_progress_reaches_one_and_raising_from_it_stops(tiny):
    model, tokens = tiny[0], tiny[1]
    corrupted = tokens.clone()
    corrupted[0, 2] = 7
    seen = []
    pairs.patch_pair(model, tokens, corrupted, 5, 9, attribution=False, names=("resid_pre",),
                     progress=lambda share, text: seen.append(share))
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) > 2

    def stop(share, text):
        if share > 0.3:
            raise InterruptedError("stop")

    with pytest.raises(InterruptedError):
        pairs.patch_pair(model, tokens, corrupted, 5, 9, attribution=False, names=("resid_pre",), progress=stop)


def test_bad_pairs_are_named(tiny):
    model, tokens = tiny[0], tiny[1]
    with pytest.raises(ValueError, match="same token length"):
        pairs.patch_pair(model, tokens, tokens[:, :-1], 5, 9)
    with pytest.raises(ValueError, match="changes nothing"):
        pairs.patch_pair(model, tokens, tokens.clone(), 5, 9, exact=False)
    with pytest.raises(ValueError, match="unknown or no sweeps"):
        pairs.patch_pair(model, tokens, tokens, 5, 9, names=("resid_post",))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pairs.patch_pair(model, tokens, tokens, 5, 999)


def test_contrast_vector_is_the_resid_pre_difference(tiny):
    model = tiny[0]
    plus, minus = torch.tensor([[4, 5, 6]]), torch.tensor([[7, 8]])
    vector = pairs.contrast_vector(model, plus, minus, 2)
    with torch.no_grad():
        _, a = model.run_with_cache(plus)
        _, b = model.run_with_cache(minus)
    assert_close(vector, a["blocks.2.hook_resid_pre"][0, -1] - b["blocks.2.hook_resid_pre"][0, -1])
    with pytest.raises(ValueError, match="out of range for the second contrast prompt"):
        pairs.contrast_vector(model, plus, minus, 2, position=2)
    for bad in ("x", float("inf"), None):
        with pytest.raises(ValueError, match="steering coefficient"):
            pairs.check_coefficient(bad)


# ---------------------------------------------------------------- the notebook's one-call explanations


@pytest.fixture(scope="module")
def default(default_gguf):
    import llamaviz

    return llamaviz.load(default_gguf)


def test_notebook_explanations_show_the_library_numbers(default):
    from llamaviz import notebook

    model, tok = default
    text, paris, rome = "The capital of France is", model.to_single_token(" Paris"), model.to_single_token(" Rome")
    figure = notebook.show_dla(model, tok, text, token=" Paris", foil=" Rome")
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, names_filter=readouts.explain_filter)
    expected = readouts.direct_logit_attribution(cache, -1, paris, rome)
    assert_close(torch.tensor(figure.data[0].y), expected.components.double(), atol=1e-4, rtol=1e-4)
    assert sum(figure.data[0].y) == pytest.approx(float(logits[0, -1, paris] - logits[0, -1, rome]), abs=1e-3)
    views = notebook.show_patching(model, tok, text, "The capital of Italy is", " Paris", " Rome", mode="attribution")
    assert_close(torch.tensor(np.asarray(views["heads"].data[0].z)), views["result"].attribution["heads"].double())
    graph = notebook.show_flow(model, tok, text, threshold=0.1)
    assert graph.data[-1].name == "nodes" and len(graph.data[-1].x) >= 1
    with pytest.raises(ValueError, match="not one"):
        notebook.show_dla(model, tok, text, token=" Parisian")
