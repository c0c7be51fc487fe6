"""Backend-neutral preparation: validate the inputs once and lay each figure out as Heatmap
panels that the plotly figures (figures.py) and their matplotlib twins (static.py) both draw."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np
import torch

from llamaviz.plots.checks import (check_index, check_layer, check_ndim, check_positive, check_tokens,
                     check_values, to_numpy)
from llamaviz.plots.tokens import display_token, position_labels, shorten

CELL_CHARS = 10         # a token drawn inside a cell is shortened to this many characters

Head = Union[int, Literal["mean"]]
Tensor = Union[torch.Tensor, np.ndarray]

LOG_FLOOR = 1e-6        # smallest weight a log colour scale shows; exact zeros stay blank
LOGPROB_FLOOR = -20.0   # colour range of the token view never goes below this (nats)
SCORE_TITLES = {
    "entropy": "attention entropy (nats)",
    "previous-token": "previous-token score",
    "induction": "induction score",
    "sink": "sink score (weight on the first token)",
    "duplicate-token": "duplicate-token score",
}


@dataclass(frozen=True)
class Heatmap:
    """One panel ready to draw: values [rows, cols] with labels; NaN cells are drawn blank."""

    values: np.ndarray                  # [rows, cols] float64
    x_labels: list[str]                 # [cols] display strings, not escaped
    y_labels: list[str]                 # [rows]
    title: str
    x_title: str
    y_title: str
    colorbar_title: str
    colorscale: str                     # a name plotly and matplotlib both know
    zmin: float
    zmax: float
    log_scale: bool = False
    top_down: bool = True               # first row drawn at the top
    cell_text: np.ndarray | None = None  # [rows, cols] str drawn in each cell
    cell_hover: np.ndarray | None = None  # [rows, cols] tuple of hover lines, not escaped


# ---------------------------------------------------------------- attention


def pattern_heads(pattern: Tensor, tokens: Sequence[str], key_tokens: Sequence[str] | None,
                  ) -> tuple[np.ndarray, list[str], list[str], bool]:
    """Validate a pattern [h, p, k] or [p, k] and its tokens; returns ([h, p, k], queries, keys, was_2d)."""
    weights = to_numpy(pattern, "pattern")
    hint = "a cache entry is [b, h, p, k]: pass pattern[0]" if weights.ndim == 4 else ""
    check_ndim(weights, "pattern", {2: "[p, k]", 3: "[h, p, k]"}, hint)
    check_values(weights, "pattern", low=0.0)
    was_2d = weights.ndim == 2
    weights = weights[None] if was_2d else weights            # [h, p, k]
    _, queries, keys = weights.shape
    query_tokens = check_tokens(tokens, "tokens", queries, "pattern's query length p")
    if key_tokens is None and keys != queries:
        raise ValueError(f"pattern has k={keys} key positions but p={queries} queries: pass key_tokens")
    key_tokens = query_tokens if key_tokens is None else check_tokens(
        key_tokens, "key_tokens", keys, "pattern's key length k")
    return weights, query_tokens, key_tokens, was_2d


def select_head(weights: np.ndarray, head: Head, was_2d: bool) -> tuple[np.ndarray, str]:
    """One head [p, k] of weights [h, p, k], or their mean; returns it with its title part."""
    if head == "mean":
        count = weights.shape[0]
        return weights.mean(axis=0), ("" if was_2d else f"mean of {count} heads")
    if was_2d:
        raise ValueError(f"head={head!r} needs a pattern [h, p, k]; a [p, k] pattern is one head "
                         "already: pass head='mean' (the default)")
    index = check_index(head, "head", weights.shape[0], "heads in pattern")
    return weights[index], f"H{index}"


def drop_first_key(weights: np.ndarray) -> np.ndarray:
    """Drop key 0 (the attention sink) of weights [p, k] and renormalise each row -> [p, k-1].

    A row with no weight left (query 0 of a causal pattern) becomes NaN and is drawn blank."""
    if weights.shape[-1] < 2:
        raise ValueError("drop_first needs at least 2 key positions; pattern has k=1")
    rest = weights[..., 1:]                                     # [p, k-1]
    totals = rest.sum(axis=-1, keepdims=True)                   # [p, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, rest / totals, np.nan)


def log_floor(values: np.ndarray) -> float:
    """Lower end of a log colour scale: the smallest positive value, at least LOG_FLOOR."""
    positive = values[np.nan_to_num(values) > 0]
    return max(LOG_FLOOR, float(positive.min())) if positive.size else LOG_FLOOR


def attention_panel(weights: np.ndarray, queries: Sequence[str], keys: Sequence[str], title: str,
                    drop_first: bool, log_scale: bool, floor: float | None = None) -> Heatmap:
    """A panel for one head's weights [p, k] (validated), keys optionally without the sink."""
    key_labels = position_labels(keys)
    if drop_first:
        weights, key_labels = drop_first_key(weights), key_labels[1:]
        title = f"{title} (first key dropped, rows renormalised)".strip()
    return Heatmap(
        values=weights, x_labels=key_labels, y_labels=position_labels(queries), title=title,
        x_title="key", y_title="query", colorbar_title="weight", colorscale="Blues",
        zmin=(floor or log_floor(weights)) if log_scale else 0.0, zmax=1.0, log_scale=log_scale)


def attention_heatmap_panel(pattern: Tensor, tokens: Sequence[str], key_tokens: Sequence[str] | None,
                            head: Head, layer: int | None, drop_first: bool,
                            log_scale: bool) -> Heatmap:
    """Validate and lay out the attention heatmap for one head or the mean of a layer."""
    weights, queries, keys, was_2d = pattern_heads(pattern, tokens, key_tokens)
    chosen, head_title = select_head(weights, head, was_2d)
    layer_title = "" if layer is None else f"L{check_layer(layer)} "
    return attention_panel(chosen, queries, keys, (layer_title + head_title).strip(),
                           drop_first, log_scale)


def head_grid_panels(pattern: Tensor, tokens: Sequence[str], key_tokens: Sequence[str] | None,
                     layer: int, drop_first: bool, log_scale: bool) -> list[Heatmap]:
    """One panel per head of a layer's pattern [h, p, k], titled "L{layer} H{head}"."""
    weights, queries, keys, was_2d = pattern_heads(pattern, tokens, key_tokens)
    if was_2d:
        raise ValueError(f"pattern must be [h, p, k] for a head grid; got shape {list(weights.shape[1:])}")
    layer = check_layer(layer)
    shown = np.stack([drop_first_key(w) for w in weights]) if drop_first else weights
    floor = log_floor(shown)
    return [attention_panel(w, queries, keys, f"L{layer} H{head}", drop_first, log_scale, floor)
            for head, w in enumerate(weights)]


# ---------------------------------------------------------------- layer x head overview


def head_overview_panel(scores: Tensor, score_name: str) -> Heatmap:
    """Scores [layers, heads] (NaN = no score) as one cell per head, layer 0 at the top."""
    values = to_numpy(scores, "scores")
    check_ndim(values, "scores", {2: "[layers, heads]"})
    check_values(values, "scores", allow_nan=True)
    if not isinstance(score_name, str) or not score_name.strip():
        raise ValueError(f"score_name must be a non-empty str such as {list(SCORE_TITLES)}; "
                         f"got {score_name!r}")
    layers, heads = values.shape
    present = values[~np.isnan(values)]
    low, high = (float(present.min()), float(present.max())) if present.size else (0.0, 1.0)
    if score_name != "entropy" and score_name in SCORE_TITLES and low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    return Heatmap(
        values=values, x_labels=[f"H{h}" for h in range(heads)],
        y_labels=[f"L{layer}" for layer in range(layers)],
        title=f"{SCORE_TITLES.get(score_name, score_name)} per head", x_title="head",
        y_title="layer", colorbar_title=score_name, colorscale="viridis",
        zmin=min(low, 0.0) if score_name == "entropy" else low, zmax=high if high > low else low + 1)


# ---------------------------------------------------------------- logit lens


def logit_lens_panel(probs: Tensor, top_tokens: Sequence[Sequence[str]], tokens: Sequence[str],
                     layer_labels: Sequence[str] | None = None) -> Heatmap:
    """Probs [layers, p] of each layer's top token, with that token [layers][p] as cell text."""
    values = to_numpy(probs, "probs")
    check_ndim(values, "probs", {2: "[layers, p]"})
    check_values(values, "probs", low=0.0, high=1.0 + 1e-4)
    layers, positions = values.shape
    check_tokens(tokens, "tokens", positions, "probs' position count p")
    if isinstance(top_tokens, str) or len(top_tokens) != layers:
        raise ValueError(f"top_tokens must be a list of {layers} rows (one per layer of probs); "
                         f"got {len(top_tokens)} rows")
    rows = [check_tokens(row, f"top_tokens[{i}]", positions, "probs' position count p")
            for i, row in enumerate(top_tokens)]
    labels = _row_labels(layer_labels, layers, [f"L{i}" for i in range(layers)], "probs")
    shown = [[display_token(token) for token in row] for row in rows]        # [layers][p]
    hover = np.empty((layers, positions), dtype=object)
    hover[:] = [[(f"top token {token}",) for token in row] for row in shown]
    return Heatmap(
        values=values, x_labels=position_labels(tokens), y_labels=labels,
        title="logit lens: top token per layer and position", x_title="position",
        y_title="layer", colorbar_title="probability", colorscale="Blues", zmin=0.0, zmax=1.0,
        top_down=False, cell_hover=hover,
        cell_text=np.array([[shorten(token, CELL_CHARS) for token in row] for row in shown],
                           dtype=object))


def _row_labels(labels: Sequence[str] | None, rows: int, default: list[str], of: str) -> list[str]:
    """Given row labels checked against the row count of `of`, or the default ones."""
    if labels is None:
        return default
    return check_tokens(labels, "layer_labels", rows, f"{of}' row count")


# ---------------------------------------------------------------- residual stream norms


def resid_norms_panel(norms: Tensor, tokens: Sequence[str],
                      layer_labels: Sequence[str] | None = None) -> Heatmap:
    """Norms [layers+1, p] of the residual stream: row 0 the embeddings, row i after layer i-1."""
    values = to_numpy(norms, "norms")
    check_ndim(values, "norms", {2: "[layers+1, p]"})
    check_values(values, "norms", low=0.0)
    rows, positions = values.shape
    check_tokens(tokens, "tokens", positions, "norms' position count p")
    default = ["embed"] + [f"after L{i}" for i in range(rows - 1)]
    return Heatmap(
        values=values, x_labels=position_labels(tokens),
        y_labels=_row_labels(layer_labels, rows, default, "norms"),
        title="residual stream norm per layer and position", x_title="position",
        y_title="layer", colorbar_title="L2 norm", colorscale="viridis",
        zmin=float(values.min()), zmax=max(float(values.max()), float(values.min()) + 1e-9),
        top_down=False)


# ---------------------------------------------------------------- tokens by log-probability

Alternatives = Sequence[Sequence[tuple[str, float]]]


def token_logprob_inputs(tokens: Sequence[str], logprobs: Tensor, alternatives: Alternatives | None,
                         ) -> tuple[list[str], np.ndarray, list[list[tuple[str, float]]]]:
    """Validate tokens [p], logprobs [p] (NaN = none, e.g. the first) and alternatives [p][n]."""
    values = to_numpy(logprobs, "logprobs")
    check_ndim(values, "logprobs", {1: "[p]"})
    check_values(values, "logprobs", allow_nan=True, high=1e-4)
    tokens = check_tokens(tokens, "tokens", values.shape[0], "logprobs' length p")
    if alternatives is None:
        return tokens, values, [[] for _ in tokens]
    if isinstance(alternatives, str) or len(alternatives) != len(tokens):
        raise ValueError(f"alternatives must have one list per token ({len(tokens)}); "
                         f"got {len(alternatives)}")
    return tokens, values, [_check_alternatives(row, i) for i, row in enumerate(alternatives)]


def _check_alternatives(row: Sequence[tuple[str, float]], position: int) -> list[tuple[str, float]]:
    """Require (token str, prob in [0, 1]) pairs for one position."""
    checked = []
    for pair in row:
        if (not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str)
                or not isinstance(pair[1], (int, float)) or not 0 <= pair[1] <= 1 + 1e-4):
            raise ValueError(f"alternatives[{position}] must hold (token str, prob in [0, 1]) "
                             f"pairs; got {pair!r}")
        checked.append((pair[0], float(pair[1])))
    return checked


def token_hover_lines(token: str, logprob: float, alternatives: list[tuple[str, float]]) -> tuple[str, ...]:
    """Hover lines for one token: itself, its log-prob and probability, then the alternatives."""
    head = f"{display_token(token)}"
    if math.isnan(logprob):
        return (head, "no prediction (first token)")
    lines = [head, f"log p = {logprob:.3f}   p = {math.exp(logprob):.4f}"]
    if alternatives:
        lines.append("top predictions:")
        lines += [f"  {display_token(alt)}   {prob:.4f}" for alt, prob in alternatives]
    return tuple(lines)


def logprob_range(values: np.ndarray) -> tuple[float, float]:
    """Colour range (nats) of a token view: [min log-prob, 0], at least 1 wide, at most 20."""
    present = values[~np.isnan(values)]
    low = float(present.min()) if present.size else -10.0
    return max(LOGPROB_FLOOR, min(low, -1.0)), 0.0


def token_grid_panel(tokens: Sequence[str], logprobs: Tensor, alternatives: Alternatives | None,
                     tokens_per_row: int = 16) -> Heatmap:
    """Tokens laid out in rows of `tokens_per_row` cells coloured by log-prob, hover per cell."""
    tokens, values, alternatives = token_logprob_inputs(tokens, logprobs, alternatives)
    width = min(check_positive(tokens_per_row, "tokens_per_row"), len(tokens))
    rows = math.ceil(len(tokens) / width)
    grid = np.full(rows * width, np.nan)
    text = np.full(rows * width, "", dtype=object)
    hover = np.empty(rows * width, dtype=object)
    hover[:] = [()] * (rows * width)
    grid[: len(tokens)] = values
    text[: len(tokens)] = [shorten(display_token(t), CELL_CHARS) for t in tokens]
    for i, token in enumerate(tokens):
        hover[i] = token_hover_lines(token, float(values[i]), alternatives[i])
    zmin, zmax = logprob_range(values)
    return Heatmap(
        values=grid.reshape(rows, width), x_labels=[str(c) for c in range(width)],
        y_labels=[str(r * width) for r in range(rows)], title="tokens by log-probability",
        x_title="", y_title="", colorbar_title="log p", colorscale="RdYlGn", zmin=zmin,
        zmax=zmax, cell_text=text.reshape(rows, width), cell_hover=hover.reshape(rows, width))
