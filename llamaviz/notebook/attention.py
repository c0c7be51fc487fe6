"""One-call figures of attention, the logit lens, token log-probabilities and residual norms."""

from __future__ import annotations

from typing import Literal

import plotly.graph_objects as go

from llamaviz import plots
from llamaviz.plots import pooling
from llamaviz.plots.checks import check_name, check_positive
from llamaviz.plots.panels import Head
from llamaviz.notebook.runs import (
    _head, _layer, _lens_labels, _resid_names, enable_offline, logit_lens_table, resid_norm_table, run, token_logprob_table,
)

_offline_ready = False
# ---------------------------------------------------------------- one-call helpers


def show_attention(model, tok, text: str, layer: int, head: Head = "mean", *,
                   drop_first: bool = False, log_scale: bool = False, queries: tuple[int, int] | None = None,
                   keys: tuple[int, int] | None = None, max_cells: int = pooling.MAX_CELLS) -> go.Figure:
    """Attention heatmap of one head (or the mean of the layer) on `text`.

    A text longer than `max_cells` tokens is shown max-pooled into at most max_cells x max_cells
    blocks; `queries=(start, stop)` / `keys=(start, stop)` zoom into exact cells instead.
    """
    enable_offline()
    layer, head = _layer(model, layer), _head(model, head)
    result = run(model, tok, text, [f"blocks.{layer}.attn.hook_pattern"], patterns="lazy")
    view = _long_view(result.tokens, queries, keys, max_cells, drop_first or log_scale)
    reader = pooling.pattern_reader(result.cache, layer, head)
    title = f"L{layer} " + ("mean of heads" if head == "mean" else f"H{head}")
    if view == "window":
        return plots.attention_window(reader, result.tokens, *_window(result.tokens, queries, keys), title=title)
    if view == "pooled":
        pooled = pooling.pooled_pattern(result.cache, layer, head, len(result.tokens), max_cells)
        return plots.pooled_attention_heatmap(pooled, result.tokens, title=title)
    return plots.attention_heatmap(result.cache["pattern", layer][0], result.tokens, head=head,
                                   layer=layer, drop_first=drop_first, log_scale=log_scale)


def show_head_grid(model, tok, text: str, layer: int, *, drop_first: bool = False,
                   log_scale: bool = False, queries: tuple[int, int] | None = None,
                   keys: tuple[int, int] | None = None, max_cells: int = 128) -> go.Figure:
    """Every head of one layer as small multiples; pooled (max_cells per side) or windowed like show_attention."""
    enable_offline()
    layer = _layer(model, layer)
    result = run(model, tok, text, [f"blocks.{layer}.attn.hook_pattern"], patterns="lazy")
    view = _long_view(result.tokens, queries, keys, max_cells, drop_first or log_scale)
    if view == "exact":
        return plots.head_grid(result.cache["pattern", layer][0], result.tokens, layer=layer,
                               drop_first=drop_first, log_scale=log_scale)
    grid, n = [], len(result.tokens)
    for head in range(model.config.num_attention_heads):
        reader = pooling.pattern_reader(result.cache, layer, head)
        if view == "window":
            grid.append(pooling.window_panel(reader, result.tokens, *_window(result.tokens, queries, keys),
                                             f"L{layer} H{head}"))
        else:
            grid.append(pooling.pooled_panel(pooling.pooled_pattern(result.cache, layer, head, n, max_cells), result.tokens,
                                             title=f"L{layer} H{head}"))
    return plots.panel_grid(grid, layer)


def _long_view(tokens: list[str], queries, keys, max_cells: int, exact_only: bool) -> str:
    """"window" when a window is asked for, "pooled" when the text has more than max_cells tokens, else "exact"."""
    max_cells = check_positive(max_cells, "max_cells")
    if queries is not None or keys is not None:
        view = "window"
    else:
        view = "pooled" if len(tokens) > max_cells else "exact"
    if view != "exact" and exact_only:
        raise ValueError(f"drop_first / log_scale apply to exact views of at most max_cells={max_cells} tokens "
                         f"(this text has {len(tokens)}); zoom with queries=(start, stop) and keys=(start, stop) "
                         "is exact but unrenormalised")
    return view


def _window(tokens: list[str], queries, keys) -> tuple[tuple[int, int], tuple[int, int]]:
    """(queries, keys) windows, each (start, stop); a missing one is the whole sequence (keys: up to the last query)."""
    n = len(tokens)
    for name, window in (("queries", queries), ("keys", keys)):
        if window is not None and (len(window) != 2 or not all(isinstance(x, int) for x in window)):
            raise ValueError(f"{name} must be (start, stop) integers, got {window!r}")
    queries = tuple(queries) if queries is not None else (0, n)
    keys = tuple(keys) if keys is not None else (0, min(n, queries[1]))
    return queries, keys


def show_logit_lens(model, tok, text: str) -> go.Figure:
    """Each layer's top next-token guess at every position (row "embed" = before layer 0)."""
    enable_offline()
    result = run(model, tok, text, _resid_names(model))
    probs, top_tokens = logit_lens_table(tok, result.cache)
    return plots.logit_lens(probs, top_tokens, result.tokens,
                            _lens_labels(model.config.num_hidden_layers))


def show_tokens(model, tok, text: str, top_k: int = 5) -> go.Figure:
    """The text's tokens coloured by their log-probability, the top_k predictions on hover."""
    top_k = check_positive(top_k, "top_k")
    enable_offline()
    result = run(model, tok, text, [])
    logprobs, alternatives = token_logprob_table(tok, result.input_ids, result.logits, top_k)
    return plots.token_logprobs(result.tokens, logprobs, alternatives)


def show_resid_norms(model, tok, text: str,
                     kind: Literal["heatmap", "line"] = "heatmap") -> go.Figure:
    """Residual-stream norm per layer and position."""
    enable_offline()
    check_name(kind, "kind", ["heatmap", "line"])
    result = run(model, tok, text, _resid_names(model))
    return plots.resid_norms(resid_norm_table(result.cache), result.tokens,
                             _lens_labels(model.config.num_hidden_layers), kind=kind)


