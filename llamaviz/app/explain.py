"""Explaining one token of a run: direct logit attribution, input attribution and information flow.

The token picked at index t (1..T-1 of prompt + continuation) was predicted at position t-1, so each
view explains ids[t] from the activations at t-1. The numbers come from llamaviz.interpret.readouts,
llamaviz.interpret.attribution and llamaviz.interpret.flow; this module only picks inputs, holds the model's lock while
a forward runs, and memoises on the run.
"""

from __future__ import annotations

import html

import torch

from llamaviz.interpret import attribution, flow, readouts
from llamaviz.llama.activation_cache import ActivationCache
from llamaviz.plots import analysis as figures
from llamaviz.plots.tokens import display_token, position_labels

from llamaviz.app import views
from llamaviz.app.state import LIVE_RUNS, Run

IG_STEPS = 32  # integrated-gradients points in the app (the latency target is set for 32)
METHODS = {"integrated gradients": "integrated_gradients", "input x gradient": "input_x_gradient",
           "saliency": "saliency"}
TOP_TOKENS = 8  # promoted / suppressed tokens shown for a flow node or edge


def token_choices(run: Run) -> list[tuple[str, int]]:
    """The picker's (label, index) pairs: every token but the first (nothing predicts it)."""
    labels = position_labels(run.tokens)
    return [(labels[i] + ("" if i < run.prompt_length else " (generated)"), i) for i in range(1, len(run.tokens))]


def default_index(run: Run, choices: list[tuple[str, int]]) -> int | None:
    """The token a new run explains first: the last generated token that is not a special token (after a
    chat-template generation the last one is the end-of-turn marker), else the last token."""
    special = set(getattr(run.entry.tokenizer, "all_special_ids", []) or [])
    ids = run.ids[0].tolist()
    for _, index in reversed(choices):
        if index >= run.prompt_length and ids[index] not in special:
            return index
    return choices[-1][1] if choices else None


def check_index(run: Run, index) -> int:
    """The picked token's index as an int in 1..T-1; ValueError naming the range otherwise."""
    if index is None or index == "":
        return len(run.tokens) - 1
    try:
        index = int(index)
    except (TypeError, ValueError):
        raise ValueError(f"pick a token to explain from the list; got {index!r}") from None
    if not 1 <= index < len(run.tokens):
        raise ValueError(f"token {index} cannot be explained: pick one of 1..{len(run.tokens) - 1} "
                         "(the first token has no position before it that predicts it)")
    return index


def foil_token(run: Run, text) -> int | None:
    """The foil's id: None for an empty box, '#1234' an id, else text that must be exactly one token."""
    text = (text or "").strip("\n")
    if not text.strip():
        return None
    model = run.entry.model
    if text.strip().startswith("#") and text.strip()[1:].isdigit():
        token = int(text.strip()[1:])
        if not 0 <= token < model.config.vocab_size:
            raise ValueError(f"token id {token} is out of range: the vocabulary has ids 0..{model.config.vocab_size - 1}")
        return token
    return single_token(model, text, "second token")


def single_token(model, text: str, what: str) -> int:
    """The id of `text` when it is one token; ValueError naming the pieces and offering the first."""
    try:
        return model.to_single_token(text)
    except ValueError:
        ids = model.to_tokens(text, prepend_bos=False)[0].tolist()
        if not ids:
            raise ValueError(f"the {what} {text!r} encodes to no token") from None
        pieces = [display_token(p) for p in model.tokenizer.convert_ids_to_tokens(ids)]
        raise ValueError(f"the {what} {text!r} is {len(ids)} tokens ({', '.join(pieces)}), not one; "
                         f"type its first token {model.tokenizer.decode(ids[:1])!r} (or #{ids[0]}) to use that") from None


def analysis_cache(run: Run) -> ActivationCache:
    """The run's activations plus what the explanations read (hook_embed, attn/mlp outputs, hook_v, the final scale)."""
    def compute() -> ActivationCache:
        cache, model = run.activations(), run.entry.model
        names = [n for n in model.hook_points() if readouts.explain_filter(n) and n not in cache]
        tensors = dict(cache._tensors)  # the stored ones: lazy patterns stay lazy (never all computed here)
        if names:
            with run.entry.lock, torch.no_grad():  # a forward on the shared model: no other request's hooks on it
                _, extra = model.run_with_cache(run.ids[:, :-1].to(model.device), names_filter=names, return_type=None)
            tensors.update(extra._tensors)
        return ActivationCache(tensors, model=model, tokens=run.ids[:, :-1], lazy=cache.lazy)

    if run.explained is None:  # kept on the run, not in the memo, so the live-runs budget counts its bytes
        run.explained = compute()
        LIVE_RUNS.settle()
    return run.explained


def logit_attribution(run: Run, index, foil=None) -> readouts.LogitAttribution:
    """The direct logit attribution of the picked token (minus the foil), at the position before it."""
    index, foil_id = check_index(run, index), foil_token(run, foil)
    token = int(run.ids[0, index])
    return views.memo(run, ("dla", index, foil_id), lambda: readouts.direct_logit_attribution(
        analysis_cache(run), index - 1, token, foil_id))


def dla_title(run: Run, result: readouts.LogitAttribution) -> str:
    pieces = run.entry.tokenizer.convert_ids_to_tokens([result.token] + ([result.foil] if result.foil is not None else []))
    what = display_token(pieces[0]) + (f" − {display_token(pieces[1])}" if result.foil is not None else "")
    return f"Direct logit attribution of {what} at position {result.position} (total {result.total:.3f})"


def dla_figure(run: Run, index, foil=None):
    result = logit_attribution(run, index, foil)
    return figures.dla_figure(result.labels, result.components, result.heads, result.accumulated,
                              result.accumulated_labels, dla_title(run, result))


def input_attribution(run: Run, index, method: str) -> attribution.InputAttribution:
    """Attribution of the picked token to every token before it ([1, index] scores), by `method` (a METHODS key)."""
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; accepted: {', '.join(METHODS)}")
    index = check_index(run, index)

    def compute() -> attribution.InputAttribution:
        model, tokens = run.entry.model, run.ids[:, :index]  # [1, index]
        extra = {"steps": IG_STEPS} if METHODS[method] == "integrated_gradients" else {}
        with run.entry.lock:  # forwards and backwards on the shared model
            return attribution.METHODS[METHODS[method]](model, tokens, target=int(run.ids[0, index]), **extra)

    return views.memo(run, ("saliency", index, method), compute)


def saliency_html(run: Run, index, method: str) -> str:
    index = check_index(run, index)
    result = input_attribution(run, index, method)
    note = ""
    if result.convergence_delta is not None:
        note = f'<div class="llamaviz-legend">{completeness_note(result)}</div>'

    return figures.saliency_html(run.tokens[:index], result.scores[0], method, run.tokens[index]) + note


def completeness_note(result: attribution.InputAttribution) -> str:
    """How far integrated gradients' scores are from summing to f(input) − f(baseline), and what that means."""
    total, change = float(result.scores.sum()), float(result.value[0] - result.baseline_value[0])
    gap = abs(total - change) / max(abs(change), 1e-12)
    note = (f"integrated gradients, {IG_STEPS} steps: the scores sum to {total:.4f}, f(input) − f(baseline) is "
            f"{change:.4f} (gap {gap:.1%})")
    if gap > 0.01:
        note += (". Not converged: from zero embeddings this model's output swings at every scale along the "
                 "path (each RMSNorm divides a tiny input by √eps), so read these scores as a rough ranking")
    return note


def flow_graph(run: Run, index, threshold) -> flow.FlowGraph:
    """The information-flow graph into the position that predicted the picked token."""
    index = check_index(run, index)
    threshold = check_threshold(threshold)
    return views.memo(run, ("flow", index, threshold),
                      lambda: flow.information_flow(analysis_cache(run), index - 1, threshold))


def check_threshold(value) -> float:
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"the flow threshold must be a number between 0 and 1; got {value!r}") from None
    if not 0 <= threshold <= 1:
        raise ValueError(f"the flow threshold must be between 0 and 1; got {threshold}")
    return round(threshold, 4)


def flow_figure(run: Run, index, threshold):
    graph = flow_graph(run, index, threshold)
    return figures.flow_figure(graph, run.cached_tokens, run.entry.config.num_hidden_layers)


def promoted(run: Run, vector: torch.Tensor) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The tokens a residual-stream vector [m] promotes and suppresses most through the unembedding (logits)."""
    model = run.entry.model
    directions = model.tokens_to_residual_directions(torch.arange(model.config.vocab_size))  # [v, m]
    logits = directions.float() @ vector.float().to(directions.device)  # [v]
    top, bottom = logits.topk(TOP_TOKENS), (-logits).topk(TOP_TOKENS)
    convert = run.entry.tokenizer.convert_ids_to_tokens
    return ([(display_token(t), v) for t, v in zip(convert(top.indices.tolist()), top.values.tolist())],
            [(display_token(t), -v) for t, v in zip(convert(bottom.indices.tolist()), bottom.values.tolist())])


def flow_detail(run: Run, index, threshold, picked: dict) -> str:
    """HTML: what a clicked edge ({"edge": i}) or node ({"layer": l, "position": p}) writes."""
    graph = flow_graph(run, index, threshold)
    cache, layers = analysis_cache(run), run.entry.config.num_hidden_layers
    labels = position_labels(run.cached_tokens)
    if "edge" in picked:
        edge = graph.edges[int(picked["edge"])]
        vector = flow.edge_vector(cache, edge)
        via = f"head L{edge.layer}H{edge.head}" if edge.kind == "attn" else f"L{edge.layer} {edge.kind}"
        what = f"Edge {labels[edge.source]} → {labels[edge.target]} via {via} (share {edge.share:.3f})"
    else:
        layer, position = int(picked["layer"]), int(picked["position"])
        name = f"blocks.{layers - 1}.hook_resid_post" if layer == layers else f"blocks.{layer}.hook_resid_pre"
        vector = cache[name][0, position].float()
        what = f"Residual stream at {labels[position]}, " + ("final" if layer == layers else f"entering L{layer}")
    up, down = promoted(run, vector)
    row = lambda pairs: ", ".join(f"<code>{html.escape(t)}</code> {v:+.2f}" for t, v in pairs)  # noqa: E731
    return (f'<div class="lv-flow-detail"><b>{html.escape(what)}</b><br>promotes: {row(up)}<br>'
            f"suppresses: {row(down)}</div>")
