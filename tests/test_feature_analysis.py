"""Analyses on features (llamaviz.features.analysis), each against a brute force from plain hooks: the
direct logit effect through the final norm's frozen scale (as logit_attrs), activation x gradient
attribution, exact ablations and steering, and activation patching of features. On a linear toy (the
final norm's scale frozen, so the metric is linear in the latents) attribution equals the ablation
effect; on the default model with a real dictionary it is checked to within 10% for the top features."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from llamaviz import features
from llamaviz.features import analysis
from test_features import S, random_dictionary
from tiny import hf_and_ours

LAST = "blocks.2.hook_resid_post"  # the tiny model's final residual stream (3 layers)
DEFAULT_DICTIONARIES = Path(__file__).resolve().parents[1] / "model" / "dictionaries"


@pytest.fixture(scope="module")
def tiny():
    _, ours = hf_and_ours("gqa")
    return ours.eval()


def spliced(sae, acts_edit=None):
    """A plain hook doing what attaching with the error term does: x -> decode(edit(encode(x))) + error."""
    def hook(x, point):
        acts = sae.encode(x)
        acts = acts if acts_edit is None else acts_edit(acts)
        return sae.decode(acts, x) + (x - sae.decode(sae.encode(x), x)).detach()
    return hook


def metric_of(token: int, foil: int):
    return lambda logits: logits[0, -1, token] - logits[0, -1, foil]


@pytest.mark.parametrize("cfg", [{"architecture": "topk", "k": 12, "rescale_acts_by_decoder_norm": True},
                                 {"architecture": "standard", "normalize_activations": "layer_norm"},
                                 {"architecture": "standard", "normalize_activations": "constant_norm_rescale"}])
def test_direct_logit_effects_follow_logit_attrs(tiny, cfg):
    sae = random_dictionary(**cfg)
    ids = torch.randint(3, 113, (2, 6))
    with torch.no_grad(), features.attached(tiny, sae, use_error_term=True):
        _, cache = tiny.run_with_cache(ids)
    effects = analysis.feature_logit_attrs(cache, sae, 5, 7)  # [b, p, F]
    x = cache["blocks.1.hook_resid_post.hook_sae_input"]
    with torch.no_grad():
        acts = sae.encode(x)
        for feature in acts[0, -1].nonzero()[:4, 0].tolist():
            alone = torch.zeros_like(acts)
            alone[..., feature] = acts[..., feature]
            sae.encode(x)  # the normalisation of x, which decode undoes
            contribution = sae.decode(alone, x) - sae.decode(torch.zeros_like(acts), x)  # [b, p, m]
            expected = cache.logit_attrs(contribution[None], 5, 7)[0]  # [b, p]
            assert_close(effects[..., feature], expected, atol=1e-5, rtol=1e-4)
    assert (effects != 0).any()
    with pytest.raises(ValueError, match="does not add into the residual stream"):
        analysis.feature_logit_attrs(cache, random_dictionary("standard", hook="blocks.1.mlp.hook_in"), 5)


def test_attribution_is_activation_times_gradient_from_plain_hooks(tiny):
    sae = random_dictionary("topk", k=10)
    ids = torch.randint(3, 113, (1, 7))
    metric = metric_of(11, 12)
    result = analysis.feature_attribution(tiny, ids, sae, metric)
    assert all(p.grad is None for p in [*tiny.parameters(), *sae.parameters()])  # parameters stayed frozen
    held = {}

    def leaf_acts(acts):
        held["acts"] = acts.detach().requires_grad_(True)
        return held["acts"]

    with torch.enable_grad():
        logits = tiny.run_with_hooks(ids, return_type="logits",
                                     fwd_hooks=[("blocks.1.hook_resid_post", spliced(sae, leaf_acts))])
        metric(logits).backward()
    name = "blocks.1.hook_resid_post.hook_sae_acts_post"
    assert_close(result.scores[name], (held["acts"] * held["acts"].grad).detach(), atol=1e-6, rtol=1e-5)
    assert_close(result.activations[name], held["acts"].detach())
    assert result.value == pytest.approx(float(metric(logits).detach()), abs=1e-5)


def test_on_a_linear_toy_attribution_equals_the_ablation_effect(tiny):
    """The final residual's SAE with ln_final's scale frozen: the metric is linear in every latent."""
    sae = random_dictionary("standard", hook=LAST)
    ids = torch.randint(3, 113, (1, 6))
    _, cache = tiny.run_with_cache(ids, names_filter=["ln_final.hook_scale"])
    frozen = [("ln_final.hook_scale", lambda scale, hook: cache["ln_final.hook_scale"].expand_as(scale))]
    metric = metric_of(20, 30)
    result = analysis.feature_attribution(tiny, ids, sae, metric, fwd_hooks=frozen)
    cells = result.top_cells(8)
    scores = torch.tensor([row[3] for row in result.top(8)])
    exact = analysis.ablation_effects(tiny, ids, sae, metric, cells, fwd_hooks=frozen)
    assert len(cells) == 8 and all(position == 5 for position, _ in cells)  # only the last position reaches it
    assert_close(exact, scores, atol=1e-5, rtol=1e-4)
    position, feature = cells[0]
    with torch.no_grad(), features.attached(tiny, sae, use_error_term=True):  # steering: value x gradient
        plain = metric(tiny.run_with_hooks(ids, return_type="logits", fwd_hooks=frozen))
        pushed = metric(tiny.run_with_hooks(ids, return_type="logits", fwd_hooks=frozen + analysis.steer_features(
            sae, [feature], 2.5, positions=[position])))
    name = analysis.acts_name(sae)
    gradient = result.scores[name][0, position, feature] / result.activations[name][0, position, feature]
    assert float(pushed - plain) == pytest.approx(2.5 * float(gradient), rel=1e-4, abs=1e-5)


def test_ablation_effects_match_plain_hooks(tiny):
    sae = random_dictionary("jumprelu")
    ids = torch.randint(3, 113, (2, 6))
    metric = lambda logits: logits[:, -2, 3].sum()  # noqa: E731  (reads both batch rows)
    with torch.no_grad():
        acts = sae.encode(tiny.run_with_cache(ids, names_filter=["blocks.1.hook_resid_post"])[1][
            "blocks.1.hook_resid_post"])
    cells = [(int(p), int(f)) for p, f in acts[0].nonzero()[:20:4]]
    exact = analysis.ablation_effects(tiny, ids, sae, metric, cells)
    with torch.no_grad():
        base = metric(tiny.run_with_hooks(ids, return_type="logits", fwd_hooks=[("blocks.1.hook_resid_post", spliced(sae))]))
        for (position, feature), value in zip(cells, exact):
            def zero(a, position=position, feature=feature):
                a = a.clone()
                a[:, position, feature] = 0
                return a
            ablated = tiny.run_with_hooks(ids, return_type="logits",
                                          fwd_hooks=[("blocks.1.hook_resid_post", spliced(sae, zero))])
            assert float(value) == pytest.approx(float(base - metric(ablated)), abs=1e-5)
    assert exact.abs().max() > 0
    with pytest.raises(ValueError, match=f"out of range; accepted: 0..{S - 1}"):
        analysis.ablate_features(sae, [S])


@pytest.mark.parametrize("by_position", [False, True])
def test_feature_patching_matches_plain_hooks(tiny, by_position):
    sae = random_dictionary("topk", k=6)
    clean_ids, corrupted_ids = torch.randint(3, 113, (1, 5)), torch.randint(3, 113, (1, 5))
    metric = metric_of(40, 41)
    with torch.no_grad(), features.attached(tiny, sae, use_error_term=True):
        _, clean_cache = tiny.run_with_cache(clean_ids)
    result = analysis.get_act_patch_features(tiny, corrupted_ids, clean_cache, metric, sae, by_position=by_position)
    assert result.shape == ((5, S) if by_position else (S,))
    clean = clean_cache[analysis.acts_name(sae)]
    with torch.no_grad():
        plain = tiny.run_with_hooks(corrupted_ids, return_type="logits",
                                    fwd_hooks=[("blocks.1.hook_resid_post", spliced(sae))])
        cells = [(p, f) for p in ([slice(None)] if not by_position else range(5)) for f in range(S)]
        for cell in cells[::7]:
            def patch(a, cell=cell):
                a = a.clone()
                a[:, cell[0], cell[1]] = clean[:, cell[0], cell[1]]
                return a
            patched = tiny.run_with_hooks(corrupted_ids, return_type="logits",
                                          fwd_hooks=[("blocks.1.hook_resid_post", spliced(sae, patch))])
            got = result[cell[1]] if not by_position else result[cell]
            assert float(got) == pytest.approx(float(metric(patched)), abs=1e-5), cell
    assert (result != float(metric(plain))).any()


def default_dictionary(layer: int) -> Path | None:
    """model/dictionaries/sae-resid-<layer>, or the folder $LLAMAVIZ_TEST_DICTIONARY names (a dictionary of the default model)."""
    if os.environ.get("LLAMAVIZ_TEST_DICTIONARY"):
        return Path(os.environ["LLAMAVIZ_TEST_DICTIONARY"])
    folder = DEFAULT_DICTIONARIES / f"sae-resid-{layer}"
    return folder if (folder / "cfg.json").exists() else None


OPEN = "the 10% goal of the dictionaries issue is open at this layer: measured "


@pytest.mark.parametrize("layer", [
    pytest.param(5, marks=pytest.mark.xfail(strict=False, reason=OPEN + "3/10 within 10%, median relative error 24%")),
    pytest.param(15, marks=pytest.mark.xfail(strict=False, reason=OPEN + "5/10 within 10%, median relative error 8.2%")),
    25])
def test_on_the_default_model_attribution_is_within_ten_percent_of_ablation(default_gguf, layer):
    """The top 10 features at positions 1.. (BOS left out: the dictionaries are trained without special tokens,
    and ablating a feature of the attention sink is far from linear) of the answer's logit."""
    folder = default_dictionary(layer)
    if folder is None:
        pytest.skip(f"no default dictionary {DEFAULT_DICTIONARIES}/sae-resid-{layer} (`make dictionaries` trains it)")
    import llamaviz

    model, _ = llamaviz.load(default_gguf)
    sae = features.load(folder)
    ids = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    with torch.no_grad():
        answer = int(model(ids, return_type="logits")[0, -1].argmax())
    metric = lambda logits: logits[0, -1, answer]  # noqa: E731
    result = analysis.feature_attribution(model, ids, sae, metric)
    scores = torch.tensor([row[3] for row in result.top(10, start=1)])
    exact = analysis.ablation_effects(model, ids, sae, metric, result.top_cells(10, start=1))
    relative = (scores - exact).abs() / exact.abs()
    within = int((relative <= 0.10).sum())
    print(f"top 10 features of {folder.name}: {within}/10 within 10% of the ablation effect, "
          f"median relative error {float(relative.median()):.3f}")
    assert within >= 8 and float(relative.median()) <= 0.10
