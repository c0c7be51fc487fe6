"""Input attribution: completeness of integrated gradients, and each method against autograd by hand."""

import pytest
import torch
from torch.testing import assert_close

from llamaviz import attribution
from tiny import hf_and_ours


@pytest.fixture(scope="module")
def model():
    return hf_and_ours("gqa")[1]


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 113, (2, 7), generator=torch.Generator().manual_seed(6))


def _by_hand(model, tokens, target, foil=None, position=-1):
    """(embeddings, d logit-difference / d embeddings) straight from autograd."""
    embeds = model.model.embed_tokens(tokens).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, return_type="logits")[:, position]
    value = logits[:, target] - (logits[:, foil] if foil is not None else 0)
    (grad,) = torch.autograd.grad(value.sum(), embeds)
    return embeds.detach(), grad


@pytest.mark.parametrize("kind,foil", [("logit", None), ("logit", 9), ("logprob", None)])
def test_integrated_gradients_are_complete_at_64_steps(model, tokens, kind, foil):
    result = attribution.integrated_gradients(model, tokens, target=5, foil=foil, steps=64, kind=kind)
    assert result.scores.shape == (2, 7) and result.raw.shape == (2, 7, 64)
    difference = result.value - result.baseline_value
    assert (result.convergence_delta.abs() <= 0.01 * difference.abs()).all()


def test_saliency_and_input_x_gradient_equal_autograd(model, tokens):
    embeds, grad = _by_hand(model, tokens, 5, 9, position=3)
    sal = attribution.saliency(model, tokens, target=5, foil=9, position=3)
    assert_close(sal.raw, grad, atol=1e-6, rtol=0)
    assert_close(sal.scores, grad.norm(dim=-1), atol=1e-6, rtol=0)
    ixg = attribution.input_x_gradient(model, tokens, target=5, foil=9, position=3)
    assert_close(ixg.scores, (embeds * grad).sum(-1), atol=1e-6, rtol=0)
    assert sal.scores[:, 4:].abs().max() == 0  # causal: tokens after the position have no effect


def test_a_baseline_and_the_default_target(model, tokens):
    baseline = model.model.embed_tokens(torch.full((1, 7), 3)).detach()
    result = attribution.integrated_gradients(model, tokens, steps=32, baseline=baseline)
    predicted = model(tokens, return_type="logits")[:, -1].argmax(-1)
    explicit = attribution.integrated_gradients(model, tokens, target=predicted, steps=32, baseline=baseline)
    assert_close(result.scores, explicit.scores)
    difference = result.value - result.baseline_value
    assert ((result.scores.sum(-1) - difference).abs() <= 0.02 * difference.abs() + 1e-4).all()


def test_bad_inputs(model, tokens):
    with pytest.raises(ValueError, match=r"position 9 is out of range for 7 tokens"):
        attribution.saliency(model, tokens, target=5, position=9)
    with pytest.raises(ValueError, match="kind 'prob'"):
        attribution.saliency(model, tokens, target=5, kind="prob")
    with pytest.raises(ValueError, match=r"target ids must be in 0\.\.112"):
        attribution.saliency(model, tokens, target=500)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        attribution.integrated_gradients(model, tokens, target=5, steps=0)


@pytest.mark.slow
def test_default_model_reports_how_far_from_completeness(default_gguf):
    import llamaviz

    model, _ = llamaviz.load(default_gguf)
    prompt = "When John and Mary went to the shops, John gave the bag to"
    result = attribution.integrated_gradients(model, prompt, target=" Mary", foil=" John", steps=64)
    logits = model(prompt, return_type="logits")[0, -1]
    expected = logits[model.to_single_token(" Mary")] - logits[model.to_single_token(" John")]
    assert_close(result.value[0], expected, atol=1e-4, rtol=0)
    assert_close(result.convergence_delta, result.scores.sum(-1) - (result.value - result.baseline_value))
    assert result.scores.shape == (1, 14) and torch.isfinite(result.scores).all()
