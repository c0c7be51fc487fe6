"""What each tab shows, computed from a Run's activations without re-running the model.

Figures come from llamaviz.plots; head scores from llamaviz.interpret.detectors; the mask printout from
llamaviz.terminal. Results are memoised on the run, so moving a slider back is instant; the memo's
bytes count in the live-runs budget. Figures are made small for the page (payload.py).

Nothing here takes the model's lock: the logit lens and the token log-probs read the final norm's
weight and lm_head directly (`readouts.readout`), which no hook of another request touches, so browsing a
finished run never waits for somebody's generation.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from llamaviz.interpret import detectors, readouts
from llamaviz import plots
from llamaviz.llama.activation_cache import ActivationCache
from llamaviz.llama.masks import build_mask
from llamaviz.plots.tokens import display_token, token_labels
from llamaviz.terminal import render_html

from llamaviz.app import attention, payload
from llamaviz.app.state import LIVE_RUNS, Run

LENS_WIDTH = 24  # positions the logit lens shows at once (each costs layers x vocab x hidden)
MASK_TOKENS = 48  # keys the mask printout shows (the last ones)
MASK_WIDTH = 170  # characters per printout line
LOGIT_CHUNK = 64  # positions per unembedding matmul in token_logprobs
MEMO_LIMIT = 64  # views kept per run (the least recently used go first)
MEMO_BYTES = 24 * 2**20  # and at most this many bytes of them per run
_MISSING = object()
_MEMO_LOCK = threading.Lock()
_IN_FLIGHT: dict[tuple[int, tuple], threading.Event] = {}  # (run, key) being computed -> set when done
SCORES: dict[str, Callable] = {  # patterns [layers, b, h, p, k], tokens [b, p] -> [layers, h]
    "entropy": lambda patterns, tokens: detectors.head_entropy(patterns),
    "previous-token": lambda patterns, tokens: detectors.previous_token_scores(patterns),
    "induction": detectors.induction_scores,
    "duplicate-token": detectors.duplicate_token_scores,
    "sink": lambda patterns, tokens: detectors.sink_scores(patterns),
}
SCORE_HELP = {
    "entropy": "mean entropy of each head's attention rows (nats): low = focused, high = spread out",
    "previous-token": "attention from each token to the one just before it",
    "induction": "attention to the token after an earlier copy of the current token ([A][B] ... [A] -> [B])",
    "duplicate-token": "attention to earlier copies of the current token",
    "sink": "attention to the first token (the attention sink)",
}


def memo(run: Run, key: tuple, compute: Callable):
    """run.memo[key], computed once and kept among the most recently used views (MEMO_LIMIT, MEMO_BYTES).

    A view being computed by another thread (a background warm-up) is waited for, not computed twice.
    """
    while True:
        with _MEMO_LOCK:  # bookkeeping only: never held while computing
            found = run.memo.pop(key, _MISSING)
            if found is not _MISSING:
                run.memo[key] = found  # reinserted last: dicts keep insertion order
                return found[0]
            flight = _IN_FLIGHT.get((id(run), key))
            if flight is None:
                flight = _IN_FLIGHT[(id(run), key)] = threading.Event()
                break
        flight.wait()  # then look again: the other thread's result is in the memo, or it failed and we compute
    try:
        value = compute()
    finally:
        with _MEMO_LOCK:
            _IN_FLIGHT.pop((id(run), key), None)
        flight.set()
    _remember(run, key, value)
    return value


def _remember(run: Run, key: tuple, value) -> None:
    """Keep a computed view in the run's memo, evicting the least recently used past the limits."""
    size = payload.json_bytes(value)
    with _MEMO_LOCK:
        if run.cache is None:  # released meanwhile: keep nothing
            return
        old = run.memo.pop(key, None)
        run.memo_bytes += size - (old[1] if old else 0)
        run.memo[key] = (value, size)
        while run.memo and (len(run.memo) > MEMO_LIMIT or run.memo_bytes > MEMO_BYTES):
            run.memo_bytes -= run.memo.pop(next(iter(run.memo)))[1]
    LIVE_RUNS.settle()


def num_layers(run: Run) -> int:
    return run.entry.config.num_hidden_layers


def num_heads(run: Run) -> int:
    return run.entry.config.num_attention_heads


def check_layer_head(run: Run, layer, head) -> tuple[int, int | str]:
    """(layer, head or "mean") checked against the run's model; ValueError naming the valid range."""
    config = run.entry.config
    layer = config.check_layer(_slider_int(layer))
    return layer, config.check_head("mean" if head in (None, -1) else _slider_int(head), mean=True)


def _slider_int(value):
    """A slider's value as an int when it is a whole number (sliders may send 3.0); else unchanged."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def pattern(run: Run, layer: int) -> torch.Tensor:
    """Attention probabilities of one layer: [h, p, k] over the run's cached positions."""
    return run.activations()["pattern", layer][0]


# ---------------------------------------------------------------- attention tab


def attention_figure(run: Run, layer, head, drop_first: bool = False, log_scale: bool = False) -> go.Figure:
    """One head's heatmap (or the layer mean's) at any length, through the attention module's one path."""
    layer, head = check_layer_head(run, layer, head)
    return memo(run, ("attention", layer, head, drop_first, log_scale),
                lambda: attention.heatmap_figure(run, layer, head, drop_first, log_scale))


def warm_attention(run: Run, layer: int, drop_first: bool = False, log_scale: bool = False) -> threading.Thread:
    """Build every head's heatmap of a layer in the background, so a head slider move only sends one.

    Only where a heatmap is cheap (exact cells, at most ATTENTION_CELLS positions): warming pooled
    views of thousands of tokens would hold the CPU that the page's next request needs."""
    def work() -> None:
        if len(run.cached_tokens) > attention.ATTENTION_CELLS:
            return
        for head in [*range(num_heads(run)), "mean"]:
            if run.cache is None:
                return
            attention_figure(run, layer, head, drop_first, log_scale)

    thread = threading.Thread(target=work, name="llamaviz-warm", daemon=True)
    thread.start()
    return thread


def head_grid_figure(run: Run, layer, drop_first: bool = False, log_scale: bool = False) -> go.Figure:
    layer, _ = check_layer_head(run, layer, "mean")
    return memo(run, ("grid", layer, drop_first, log_scale),
                lambda: attention.grid_figure(run, layer, drop_first, log_scale))


def head_scores(run: Run, score: str) -> torch.Tensor:
    """One score per head, [layers, heads], computed a layer at a time (no stacked copy of all patterns)."""
    if score not in SCORES:
        raise ValueError(f"unknown head score {score!r}; accepted: {', '.join(SCORES)}")
    tokens = run.ids[:, :-1]  # [1, T-1]: the positions the patterns cover

    def compute() -> torch.Tensor:  # lazy patterns, one layer and one block of queries at a time
        return detectors.head_scores(run.activations(), tokens, kinds=[score])[score]  # [layers, h]

    return memo(run, ("scores", score), compute)


def overview_figure(run: Run, score: str) -> go.Figure:
    return memo(run, ("overview", score), lambda: plots.head_overview(head_scores(run, score), score))


def score_note(run: Run, score: str) -> str:
    """What the chosen score measures, and when this text cannot show it."""
    note = SCORE_HELP.get(score, "")
    ids = run.ids[0, :-1].tolist()
    if score in ("induction", "duplicate-token") and len(set(ids)) == len(ids):
        note += ". No token occurs twice in this text, so every head scores 0: try a prompt that repeats itself"
    return note


# ---------------------------------------------------------------- mask tab


def mask_html(run: Run) -> str:
    """The causal mask of the run's tokens from build_mask, as the terminal prints it (escaped <pre>)."""
    def compute() -> str:
        tokens = token_labels(run.entry.tokenizer, run.ids[0].tolist())  # '␣John', as the terminal labels rows
        window = run.entry.config.sliding_window
        mask = build_mask(len(tokens), sliding_window=window)  # [1, 1, T, T]
        info = [f"{len(tokens)} tokens: {run.prompt_length} from the prompt, {run.new_tokens} generated",
                "the model's attention patterns are zero wherever this mask says masked"]
        return render_html(tokens, mask, title=f"Attention mask · {run.entry.name}", info=info,
                           width=MASK_WIDTH, max_tokens=MASK_TOKENS)

    return memo(run, ("mask",), compute)


# ---------------------------------------------------------------- logit lens tab


lens_labels = readouts.lens_labels  # rows of the accumulated residual stream: embed, then after each layer


def lens_window(run: Run, start) -> tuple[int, int]:
    """[start, end) positions of the logit lens; start None = the last LENS_WIDTH positions."""
    count = len(run.cached_tokens)
    start = max(0, count - LENS_WIDTH) if start is None else int(start)
    if not 0 <= start < count:
        raise ValueError(f"logit lens start {start} is out of range: positions are 0..{count - 1}")
    return start, min(count, start + LENS_WIDTH)


def lens_table(run: Run, start=None) -> tuple[torch.Tensor, list[list[str]], list[str], list[str]]:
    """cache.logit_lens(top_k=1) on a window of positions: (top-token probs [layers+1, p], their tokens
    [layers+1][p], the window's tokens [p], row labels)."""
    start, end = lens_window(run, start)

    def compute():
        cache, layers = run.activations(), num_layers(run)
        window = ActivationCache({n: cache[n][:, start:end] for n in readouts.resid_names(layers)},
                                 model=run.entry.model)
        probs, top_ids = readouts.logit_lens_table(window)  # [layers+1, p] each; no model lock
        top_tokens = [run.entry.tokenizer.convert_ids_to_tokens(row.tolist()) for row in top_ids]
        return probs, top_tokens, run.cached_tokens[start:end], lens_labels(layers)

    return memo(run, ("lens-table", start), compute)


def warm_lens(run: Run) -> threading.Thread:
    """Compute the logit lens of the last positions in the background after a run (the costliest view:
    a full-vocabulary readout per layer), so opening its tab answers at once even while the CPU is busy."""
    def work() -> None:
        if run.cache is not None:
            try:
                logit_lens_figure(run)
            except ValueError:  # released meanwhile: the tab reports it when opened
                pass

    thread = threading.Thread(target=work, name="llamaviz-warm-lens", daemon=True)
    thread.start()
    return thread


def logit_lens_figure(run: Run, start=None) -> go.Figure:
    start, _ = lens_window(run, start)
    return memo(run, ("lens", start), lambda: plots.logit_lens(*lens_table(run, start)))


# ---------------------------------------------------------------- tokens tab


def token_logprobs(run: Run, top: int = 5) -> tuple[torch.Tensor, list[list[tuple[str, float]]]]:
    """Log-prob of every token given those before it [T] (NaN for the first) and the top predictions there.

    Recomputed from the captured final residual stream (norm + lm_head), a chunk of positions at a
    time: exact, and no [T, vocab] logits tensor is ever kept.
    """
    def compute():
        final = run.activations()[f"blocks.{num_layers(run) - 1}.hook_resid_post"][0]  # [T-1, m]
        table = readouts.token_logprobs(readouts.final_logits(run.entry.model, final, LOGIT_CHUNK), run.ids[0], top)
        convert = run.entry.tokenizer.convert_ids_to_tokens
        alternatives = [list(zip(convert(ids), probs)) for ids, probs in zip(table.top_ids.tolist(),
                                                                            table.top_probs.tolist())]
        return table.chosen, [[]] + alternatives

    return memo(run, ("logprobs", top), compute)


def tokens_html(run: Run) -> str:
    logprobs, alternatives = token_logprobs(run)
    return plots.tokens_html(run.tokens, logprobs, alternatives)


def tokens_figure(run: Run) -> go.Figure:
    logprobs, alternatives = token_logprobs(run)
    return memo(run, ("tokens-figure",), lambda: plots.token_logprobs(run.tokens, logprobs, alternatives))


def tokens_table(run: Run) -> pd.DataFrame:
    """One row per token: position, token, source, log p, and the top-5 predictions for that slot."""
    logprobs, alternatives = token_logprobs(run)
    rows = []
    for position, (token, value, alts) in enumerate(zip(run.tokens, logprobs.tolist(), alternatives)):
        rows.append({
            "pos": position, "token": display_token(token),
            "from": "prompt" if position < run.prompt_length else "generated",
            "log p": None if math.isnan(value) else round(value, 3),
            "top-5 predictions (p)": "  ".join(f"{display_token(t)} {p:.3f}" for t, p in alts),
        })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- activations tab


def resid_norm_table(run: Run) -> tuple[torch.Tensor, list[str], list[str]]:
    """(L2 norm of the residual stream [layers+1, p], tokens [p], row labels)."""
    def compute():
        norms = readouts.resid_norms(run.activations())  # [layers+1, p]
        return norms, run.cached_tokens, readouts.norm_labels(num_layers(run))

    return memo(run, ("resid-norms-table",), compute)


def resid_norms_figure(run: Run) -> go.Figure:
    """plots.resid_norms with the colour scale capped at the largest norm after position 0.

    The first token's residual stream (the attention sink) is often ~100x larger than the rest and
    would leave every other cell the same dark colour; capped, it shows saturated and hover gives its value.
    """
    def compute() -> go.Figure:
        norms, tokens, labels = resid_norm_table(run)
        figure = payload.float32_traces(plots.resid_norms(norms, tokens, labels))
        if norms.shape[1] > 1:
            figure.update_traces(zmax=float(norms[:, 1:].max()), zauto=False)
        return figure

    return memo(run, ("resid-norms",), compute)


def mlp_stats(run: Run) -> pd.DataFrame:
    """Per layer, over all positions: mean |post|, fraction > 0, fraction |post| > 0.1, max |post|."""
    def compute() -> pd.DataFrame:
        if run.stats is not None:  # gathered while generating: no [T, f] activation is kept
            return pd.DataFrame(run.stats.mlp_rows())
        rows = []
        for layer in range(num_layers(run)):
            post = run.activations()["post", layer][0].float()  # [p, f]
            size = post.abs()
            rows.append({"layer": layer, "mean |post|": round(size.mean().item(), 4),
                         "fraction > 0": round((post > 0).float().mean().item(), 4),
                         "fraction |post| > 0.1": round((size > 0.1).float().mean().item(), 4),
                         "max |post|": round(size.max().item(), 3)})
        return pd.DataFrame(rows)

    return memo(run, ("mlp-stats",), compute)


def mlp_figure(run: Run) -> go.Figure:
    """mean |post| and the fraction of positive MLP activations per layer, side by side."""
    stats = mlp_stats(run)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("mean |MLP post| per layer",
                                                         "fraction of MLP activations > 0"))
    fig.add_trace(go.Bar(x=stats["layer"], y=stats["mean |post|"], name="mean |post|"), row=1, col=1)
    fig.add_trace(go.Bar(x=stats["layer"], y=stats["fraction > 0"], name="fraction > 0"), row=1, col=2)
    fig.update_layout(template="plotly_white", height=330, showlegend=False, margin={"l": 10, "r": 10, "t": 50})
    fig.update_xaxes(title_text="layer")
    return fig
