"""One-call helpers for notebooks: run the model on a text and get a figure back.

Figures render offline: on first use inside IPython the helpers switch plotly to a renderer that
inlines plotly.js into the notebook once (no CDN) and gives each figure both plotly's mimetype
and HTML, which Jupyter, VS Code and nbconvert's static HTML export all display. `save_html`
writes a standalone page with plotly.js inlined; `open_view` reopens a view file saved by the
web app.

A view file is JSON: {"model": path or null (the default model), "prompt": str, "seed": int or
null, "settings": {"layer": int, "head": int or "mean", "drop_first": bool, "log_scale": bool,
"top_k": int}}; every setting is optional.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import plotly.graph_objects as go
import plotly.io as pio
import torch
from plotly.io.base_renderers import NotebookRenderer

from . import plots, readouts
from .plots import pooling
from .plots.checks import check_name, check_positive
from .plots.html import save_html  # noqa: F401  (re-exported: notebook.save_html)
from .plots.panels import Head

_offline_ready = False
OFFLINE_RENDERERS = "plotly_mimetype+llamaviz_notebook"


class OfflineNotebookRenderer(NotebookRenderer):
    """plotly's "notebook" renderer (plotly.js inlined once, on first display) without the
    MathJax CDN script that renderer adds to every figure."""

    def to_mimebundle(self, fig_dict: dict) -> dict:
        html = pio.to_html(fig_dict, config=self.config, include_plotlyjs=False,
                           include_mathjax=False, full_html=False, default_width="100%",
                           default_height=525, validate=False)
        return {"text/html": html}


LONG_PREFILL = 1024  # tokens from which capturing shows a progress bar


def enable_offline() -> bool:
    """Make figures render offline in this notebook: plotly.js is inlined once, before the
    first figure shown, and each figure carries both plotly's mimetype (JupyterLab, VS Code)
    and HTML (classic notebook, nbconvert). Returns False outside IPython."""
    global _offline_ready
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    if get_ipython() is None:
        return False
    if not _offline_ready:
        pio.renderers["llamaviz_notebook"] = OfflineNotebookRenderer()
        pio.renderers.default = OFFLINE_RENDERERS
        _offline_ready = True
    return True


# ---------------------------------------------------------------- running the model


@dataclass
class Run:
    """One forward pass: input ids [1, p], their token strings, logits [1, p, v] and the cache."""

    input_ids: torch.Tensor
    tokens: list[str]
    logits: torch.Tensor
    cache: Any


def encode(tok, text: str) -> tuple[torch.Tensor, list[str]]:
    """Token ids [1, p] and token strings of a non-empty text."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string; got {text!r}")
    ids = tok(text, return_tensors="pt")["input_ids"]                      # [1, p]
    return ids, tok.display_tokens(ids[0].tolist())


def run(model, tok, text: str, names: list[str], ids: torch.Tensor | None = None, patterns: str = "stored") -> Run:
    """Run `text` (or exactly the token `ids` [1, p] when given) caching the hook points in `names`."""
    if ids is None:
        ids, tokens = encode(tok, text)
    else:
        tokens = tok.display_tokens(ids[0].tolist())
    with torch.no_grad():
        if not names:
            return Run(ids, tokens, model(ids.to(model.device)).logits, None)
        logits, cache = model.run_with_cache(ids.to(model.device), names_filter=names, patterns=patterns,
                                             progress=ids.shape[1] >= LONG_PREFILL)  # a bar for long texts
    return Run(ids, tokens, logits, cache)


def _layer(model, layer: int) -> int:
    """Check a layer index against the model."""
    return model.config.check_layer(layer)


def _head(model, head: Head) -> Head:
    """Check a head index (or "mean") against the model."""
    return model.config.check_head(head, mean=True)


def _resid_names(model) -> list[str]:
    """The hook points accumulated_resid stacks: every resid_pre and the last resid_post."""
    return readouts.resid_names(model.config.num_hidden_layers)


_lens_labels = readouts.lens_labels


# ---------------------------------------------------------------- tables behind the figures


def logit_lens_table(tok, cache) -> tuple[torch.Tensor, list[list[str]]]:
    """Top-token probability [layers+1, p] and top token strings [layers+1][p] of each layer."""
    probs, ids = readouts.logit_lens_table(cache)
    return probs, [tok.display_tokens(row.tolist()) for row in ids]


def token_logprob_table(tok, input_ids: torch.Tensor, logits: torch.Tensor, top_k: int = 5,
                        ) -> tuple[torch.Tensor, list[list[tuple[str, float]]]]:
    """Log-prob of each token given the ones before [p] (NaN first) and the top_k predictions."""
    top_k = check_positive(top_k, "top_k")
    table = readouts.token_logprobs([logits[0, :-1]], input_ids[0], top_k)
    alternatives = [[]] + [list(zip(tok.display_tokens(ids), probs))
                           for ids, probs in zip(table.top_ids.tolist(), table.top_probs.tolist())]
    return table.chosen, alternatives


def resid_norm_table(cache) -> torch.Tensor:
    """L2 norm of the residual stream [layers+1, p] (first batch row)."""
    return readouts.resid_norms(cache)


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


# ---------------------------------------------------------------- views saved by the web app

VIEW_SETTINGS = {"layer": 0, "head": "mean", "drop_first": False, "log_scale": False, "top_k": 5}
VIEW_MAX_BYTES = 16 * 2**20  # a view file holds a prompt, settings and at most a context of token ids
VIEW_MAX_TOP_K = 100


@dataclass
class View:
    """A reopened view: its model, the run on its prompt and the regenerated figures by name
    ("attention", "head_grid", "logit_lens", "tokens", "resid_norms")."""

    model: Any
    tokenizer: Any
    model_path: Path | None
    prompt: str
    seed: int | None
    settings: dict
    run: Run
    figures: dict[str, go.Figure] = field(default_factory=dict)


def read_view(path: str | Path) -> dict:
    """Parse and check a view file; returns {"model", "prompt", "seed", "token_ids", "settings"} with defaults."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no view file at {path}")
    if path.stat().st_size > VIEW_MAX_BYTES:
        raise ValueError(f"{path} has {path.stat().st_size:,} bytes; a view file has at most {VIEW_MAX_BYTES:,}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not a JSON view file: {type(err).__name__}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object; got {type(data).__name__}")
    prompt, seed, settings = data.get("prompt"), data.get("seed"), data.get("settings", {})
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{path}: \"prompt\" must be a non-empty string; got {prompt!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise ValueError(f"{path}: \"seed\" must be an int or null (ints from 0 to 2**64 - 1); got {seed!r}")
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: \"settings\" must be an object; got {settings!r}")
    _check_settings(path, settings)
    model = data.get("model", data.get("model_path"))
    if model is not None and not isinstance(model, str):
        raise ValueError(f"{path}: \"model\" must be a path string or null; got {model!r}")
    token_ids = data.get("token_ids")  # the app stores the exact sequence it showed
    if token_ids is not None and (not isinstance(token_ids, list) or not token_ids
                                  or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**63
                                             for i in token_ids)):
        raise ValueError(f"{path}: \"token_ids\" must be a non-empty list of token ids (ints >= 0) or absent")
    return {"model": _model_path(model, path), "prompt": prompt, "seed": seed, "token_ids": token_ids,
            "settings": {**VIEW_SETTINGS, **settings}}


def _check_settings(path: Path, settings: dict) -> None:
    """ValueError naming a view setting of the wrong type (ranges are checked against the model later)."""
    kinds = {"layer": (int,), "head": (int, str), "drop_first": (bool,), "log_scale": (bool,), "top_k": (int,),
             "score": (str,)}
    for key, accepted in kinds.items():
        value = settings.get(key, VIEW_SETTINGS.get(key, ""))
        wrong = not isinstance(value, accepted) or (bool not in accepted and isinstance(value, bool))
        if wrong or (key == "top_k" and not 1 <= value <= VIEW_MAX_TOP_K):
            names = " or ".join(kind.__name__ for kind in accepted)
            extra = f" from 1 to {VIEW_MAX_TOP_K}" if key == "top_k" else ""
            raise ValueError(f"{path}: setting {key!r} must be {names}{extra}; got {value!r}")


def _check_token_ids(model, ids: list[int] | None) -> None:
    """Token ids of a view against the model: inside its vocabulary and its context."""
    if ids is None:
        return
    config = model.config
    if max(ids) >= config.vocab_size:
        raise ValueError(f"the view's token id {max(ids)} is outside the model's vocabulary (0..{config.vocab_size - 1})")
    if len(ids) > config.max_position_embeddings:
        raise ValueError(f"the view has {len(ids):,} tokens; the model's context is {config.max_position_embeddings:,}")


def _model_path(model: str | None, view_path: Path) -> Path | None:
    """A view's model path: absolute, else relative to the working folder or to the view file."""
    if model is None:
        return None
    candidate = Path(model).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    beside = view_path.parent / candidate
    return beside if beside.exists() else candidate


def open_view(path: str | Path, model=None, tok=None) -> View:
    """Reopen a view saved by the web app: load its model (or use the given model and tok), rerun
    its token ids (or its prompt, when the file has none) and regenerate the figures with its settings."""
    view = read_view(path)
    if model is None or tok is None:
        from . import load

        model, tok = load(view["model"])
    enable_offline()
    settings = view["settings"]
    layer, head = _layer(model, settings["layer"]), _head(model, settings["head"])
    _check_token_ids(model, view["token_ids"])
    if view["seed"] is not None:
        torch.manual_seed(view["seed"])
    ids = torch.tensor([view["token_ids"]]) if view["token_ids"] else None  # [1, p]: what the app showed
    result = run(model, tok, view["prompt"], [f"blocks.{layer}.attn.hook_pattern", *_resid_names(model)], ids)
    figures = _view_figures(model, tok, result, layer, head, settings)
    return View(model, tok, view["model"], view["prompt"], view["seed"], settings, result, figures)


def _view_figures(model, tok, result: Run, layer: int, head: Head, settings: dict) -> dict[str, go.Figure]:
    """Every figure of a view from one run."""
    pattern = result.cache["pattern", layer][0]                               # [h, p, k]
    style = {"drop_first": bool(settings["drop_first"]), "log_scale": bool(settings["log_scale"])}
    probs, top_tokens = logit_lens_table(tok, result.cache)
    logprobs, alternatives = token_logprob_table(tok, result.input_ids, result.logits,
                                                 settings["top_k"])
    labels = _lens_labels(model.config.num_hidden_layers)
    return {
        "attention": plots.attention_heatmap(pattern, result.tokens, head=head, layer=layer, **style),
        "head_grid": plots.head_grid(pattern, result.tokens, layer=layer, **style),
        "logit_lens": plots.logit_lens(probs, top_tokens, result.tokens, labels),
        "tokens": plots.token_logprobs(result.tokens, logprobs, alternatives),
        "resid_norms": plots.resid_norms(resid_norm_table(result.cache), result.tokens, labels),
    }


# The one-call explanations live in notebook_explain.py; `notebook.show_dla(...)` and friends still work.
from .notebook_explain import open_patching, show_dla, show_flow, show_patching, show_saliency  # noqa: E402,F401
