"""Steering: add a vector to the residual stream while generating, next to the plain continuation.

The vector is activation addition's contrast (resid_pre of a layer at a position: the first prompt's
minus the second's, llamaviz.interpret.pairs.contrast_vector) or a head's output at the picked position of the
run; `llamaviz.interpret.interventions.steer` adds coefficient x vector at every position of that layer. Both
continuations use the run's prompt, settings and seed, under the model's lock.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import torch

from llamaviz.interpret import pairs
from llamaviz.run.generation import generate
from llamaviz.interpret.interventions import steer

from llamaviz.app import explain
from llamaviz.app.generating import encode_prompt
from llamaviz.app.intervene import parse_heads
from llamaviz.app.state import Run

SOURCES = ("contrast prompts", "head output")
MAX_STEER_TOKENS = 64  # continuation length of each side (two generations per click)


@dataclass
class Steered:
    """The plain and steered continuations of the run's prompt, and what was added."""

    plain: str
    steered: str
    layer: int
    coefficient: float
    norm: float  # |vector| before the coefficient
    source: str


def check_layer(run: Run, layer) -> int:
    layers = run.entry.config.num_hidden_layers
    try:
        value = float(layer)
    except (TypeError, ValueError):
        raise ValueError(f"the steering layer must be a whole number in 0..{layers - 1}; got {layer!r}") from None
    if not value.is_integer() or not 0 <= value < layers:
        raise ValueError(f"the steering layer must be a whole number in 0..{layers - 1}; got {layer!r}")
    return int(value)


def steering_vector(run: Run, source: str, layer: int, plus: str, minus: str, head_text: str, index) -> torch.Tensor:
    """The vector [m] of the chosen source; ValueError for missing prompts or a bad head."""
    if source == "contrast prompts":
        if not (plus or "").strip() or not (minus or "").strip():
            raise ValueError("type both contrast prompts (e.g. 'Love' and 'Hate'): the vector is their "
                             "residual difference")
        encode = lambda text: encode_prompt(run.entry, text, False)[0]  # noqa: E731
        with run.entry.lock:
            return pairs.contrast_vector(run.entry.model, encode(plus), encode(minus), layer)
    if source == "head output":
        heads = parse_heads(head_text)
        if len(heads) != 1:
            raise ValueError(f"pick one head for the steering vector (e.g. '3.1'); got {len(heads)}")
        head_layer, head = heads[0]
        run.entry.config.check_layer(head_layer)
        run.entry.config.check_head(head)
        cache = explain.analysis_cache(run)
        position = explain.check_index(run, index) - 1
        return cache.stack_head_results(head_layer + 1, pos_slice=position)[-run.entry.config.num_attention_heads
                                                                           + head, 0].float()
    raise ValueError(f"unknown steering source {source!r}; accepted: {', '.join(SOURCES)}")


def run_steering(run: Run, source: str, layer, coefficient, plus: str, minus: str, head_text: str,
                 index, max_new_tokens: int | None = None) -> Steered:
    layer = check_layer(run, layer)
    coefficient = pairs.check_coefficient(coefficient)
    vector = steering_vector(run, source, layer, plus, minus, head_text, index)
    model, prompt = run.entry.model, run.ids[:, :run.prompt_length].to(run.entry.model.device)
    new = min(max_new_tokens or run.settings.max_new_tokens, MAX_STEER_TOKENS)
    settings = run.settings.sampling()
    with run.entry.lock, torch.no_grad():
        plain = generate(model, prompt, max_new_tokens=new, **settings)
        with model.hooks(fwd_hooks=steer(layer, vector, coefficient, hook="hook_resid_pre")):
            steered = generate(model, prompt, max_new_tokens=new, **settings)
    decode = lambda ids: run.entry.tokenizer.decode(ids[0, prompt.shape[1]:].tolist(), skip_special_tokens=True)  # noqa: E731
    return Steered(decode(plain), decode(steered), layer, coefficient, float(vector.norm()), source)


def steered_html(result: Steered) -> str:
    """The two continuations side by side, escaped."""
    column = lambda title, text: (f'<div class="lv-steer-col" style="flex:1;min-width:0"><b>{html.escape(title)}</b>'  # noqa: E731
                                  f'<pre style="white-space:pre-wrap">{html.escape(text)}</pre></div>')
    added = f"steered: + {result.coefficient:g} x vector (|v| = {result.norm:.2f}) at L{result.layer} resid_pre"
    return (f'<div class="lv-steer" style="display:flex;gap:1em">{column("plain", result.plain)}'
            f"{column(added, result.steered)}</div>")
