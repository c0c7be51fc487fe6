"""Input attribution: how much each prompt token's embedding moves one output, by gradients.

The output is f = the target token's logit (or log-probability, or its logit minus a foil's) at one
position. Scores per token [b, p] come with the raw per-feature values [b, p, m]:
  saliency            the L2 norm of df/dx over features (raw: the gradient)
  input_x_gradient    x . df/dx (raw: x * df/dx)
  integrated_gradients (x - x0) . mean of df/dx along the straight path from the baseline x0 to x
                      (raw: per feature); completeness: the scores sum to f(x) - f(x0), and
                      `convergence_delta` says how far a given number of steps is from it.
A deep RMSNorm model from a zero baseline is a hard integrand: each norm divides a tiny input by
sqrt(eps), a gain of about 1e3 per layer on SmolLM2-135M, so three layers in the residual stream is
back to full scale however small the input: f(a * x) swings at every scale of a down to float32's
limits (measured still O(1) and changing at a = 1e-10), and no quadrature of 64 points converges
(convergence_delta 8 to 21 times f(x) - f(0) on three prompts). Shallow or tiny models are fine
(1e-4 at 64 steps in the tests). On such a model check convergence_delta, or pass a baseline that
keeps the first position (the attention sink) as it is.
Integration points: see path_points (log-spaced from a zero baseline); batches of steps run together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llamaviz.llama.hook_points import frozen_parameters

TARGET_KINDS = ("logit", "logprob")
LOWEST_ALPHA = 1e-8  # log-spaced points reach down to here; below, f is taken as linear in alpha


@dataclass
class InputAttribution:
    scores: torch.Tensor  # [b, p] one number per input token
    raw: torch.Tensor  # [b, p, m] per embedding feature
    method: str
    value: torch.Tensor  # [b] f at the input
    baseline_value: torch.Tensor | None = None  # [b] f at the baseline (integrated gradients)

    @property
    def convergence_delta(self) -> torch.Tensor | None:
        """[b] scores.sum - (f(x) - f(baseline)): how far integrated gradients are from completeness."""
        if self.baseline_value is None:
            return None
        return self.scores.sum(-1) - (self.value - self.baseline_value)


def saliency(model, tokens, target=None, foil=None, position: int = -1, kind: str = "logit") -> InputAttribution:
    """Gradient of the output with respect to each input embedding; score = its L2 norm."""
    embeds, target, foil = _prepare(model, tokens, target, foil, position, kind)
    value, grad = _value_and_grad(model, embeds, target, foil, position, kind)
    return InputAttribution(grad.norm(dim=-1), grad, "saliency", value)


def input_x_gradient(model, tokens, target=None, foil=None, position: int = -1, kind: str = "logit") -> InputAttribution:
    """Embedding times gradient; score = the sum over features."""
    embeds, target, foil = _prepare(model, tokens, target, foil, position, kind)
    value, grad = _value_and_grad(model, embeds, target, foil, position, kind)
    raw = embeds * grad
    return InputAttribution(raw.sum(-1), raw, "input_x_gradient", value)


def integrated_gradients(model, tokens, target=None, foil=None, position: int = -1, steps: int = 64,
                         baseline: torch.Tensor | None = None, kind: str = "logit",
                         batch_size: int | None = None) -> InputAttribution:
    """(x - baseline) times the path-averaged gradient; baseline None = zero embeddings."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    embeds, target, foil = _prepare(model, tokens, target, foil, position, kind)
    base = torch.zeros_like(embeds) if baseline is None else baseline.to(embeds.device, embeds.dtype).expand_as(embeds)
    b = embeds.shape[0]
    alphas, weights = path_points(steps, log_spaced=baseline is None)
    chunk = batch_size or max(1, 64 // b)
    total = torch.zeros_like(embeds, dtype=torch.float32)
    for start in range(0, steps, chunk):
        a = alphas[start:start + chunk].to(embeds.device, embeds.dtype)  # [s]
        w = weights[start:start + chunk].to(embeds.device, torch.float32)
        path = base[None] + a[:, None, None, None] * (embeds - base)[None]  # [s, b, p, m]
        _, grad = _value_and_grad(model, path.flatten(0, 1), target.repeat(len(a)), foil_rows(foil, len(a)),
                                  position, kind)
        total += (grad.view(len(a), *embeds.shape).float() * w[:, None, None, None]).sum(0)
    raw = (embeds - base).float() * total
    with torch.no_grad():
        value = _output(model, embeds, target, foil, position, kind)
        start_value = _output(model, base, target, foil, position, kind)
    return InputAttribution(raw.sum(-1), raw, "integrated_gradients", value, start_value)


def path_points(steps: int, log_spaced: bool):
    """(alphas [steps], weights [steps]) of a quadrature of [0, 1] whose weights sum to 1.

    From a zero baseline every RMSNorm makes f(a) a near-step where a * rms(x) passes sqrt(eps),
    at a place that depends on the model (seen between 1e-6 and 1e-2). So the integral is taken
    over log(a) from LOWEST_ALPHA to 1 by Gauss-Legendre (weights a * d log a), plus one point for
    [0, LOWEST_ALPHA], where f is linear in a. Other baselines use the midpoint rule.
    """
    if not log_spaced or steps < 2:
        return (torch.arange(steps, dtype=torch.float64) + 0.5) / steps, torch.full((steps,), 1.0 / steps)
    nodes, weights = np.polynomial.legendre.leggauss(steps - 1)  # on [-1, 1]
    low = np.log(LOWEST_ALPHA)
    u = low / 2 * (1 - nodes)  # [-1, 1] -> [log LOWEST_ALPHA, 0]
    alphas = np.concatenate([[LOWEST_ALPHA / 2], np.exp(u)])
    weights = np.concatenate([[LOWEST_ALPHA], -low / 2 * weights * np.exp(u)])
    return torch.from_numpy(alphas), torch.from_numpy(weights / weights.sum())


def foil_rows(foil, repeats: int):
    return None if foil is None else foil.repeat(repeats)


METHODS = {"integrated_gradients": integrated_gradients, "input_x_gradient": input_x_gradient, "saliency": saliency}


def _prepare(model, tokens, target, foil, position, kind):
    """(input embeddings [b, p, m], target ids [b], foil ids [b] or None) after checking the arguments."""
    if kind not in TARGET_KINDS:
        raise ValueError(f"kind {kind!r} is not supported; accepted: {', '.join(TARGET_KINDS)}")
    tokens, _ = model.text_input(tokens)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be text or ids [batch, positions]; got {getattr(tokens, 'shape', tokens)!r}")
    p = tokens.shape[1]
    if isinstance(position, bool) or not isinstance(position, int) or not -p <= position < p:
        raise ValueError(f"position {position!r} is out of range for {p} tokens; accepted: {-p}..{p - 1}")
    with torch.no_grad():
        embeds = model.model.embed_tokens(tokens.to(model.device))  # [b, p, m]
        if target is None:  # the model's own next token
            target = model(inputs_embeds=embeds, return_type="logits")[:, position].argmax(-1)
    return embeds, _ids(model, target, tokens.shape[0], "target"), (
        None if foil is None else _ids(model, foil, tokens.shape[0], "foil"))


def _ids(model, token, batch: int, what: str) -> torch.Tensor:
    if isinstance(token, str):
        token = model.to_single_token(token)
    ids = torch.as_tensor(token, device=model.device).long().reshape(-1)
    if ids.numel() == 1:
        ids = ids.expand(batch)
    if ids.numel() != batch:
        raise ValueError(f"{what} must be one token id or one per batch row ({batch}); got {ids.numel()}")
    if ((ids < 0) | (ids >= model.config.vocab_size)).any():
        raise ValueError(f"{what} ids must be in 0..{model.config.vocab_size - 1}, got {ids.tolist()}")
    return ids


def _output(model, embeds, target, foil, position, kind) -> torch.Tensor:
    """f [b]: the target's logit or log-probability at `position`, minus the foil's when given."""
    logits = model(inputs_embeds=embeds, return_type="logits")[:, position].float()  # [b, v]
    scores = logits.log_softmax(-1) if kind == "logprob" else logits
    value = scores.gather(-1, target[:, None])[:, 0]
    if foil is not None:
        value = value - scores.gather(-1, foil[:, None])[:, 0]
    return value


def _value_and_grad(model, embeds, target, foil, position, kind):
    x = embeds.detach().requires_grad_(True)
    with frozen_parameters(model), torch.enable_grad():
        value = _output(model, x, target, foil, position, kind)
        (grad,) = torch.autograd.grad(value.sum(), x)  # rows are independent: the sum's gradient is each row's
    return value.detach(), grad
