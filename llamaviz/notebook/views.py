"""Views saved by the web app, reopened in a notebook.

A view file is JSON: {"model": path or null (the default model), "prompt": str, "seed": int or
null, "settings": {"layer": int, "head": int or "mean", "drop_first": bool, "log_scale": bool,
"top_k": int}}; every setting is optional.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch

from llamaviz import plots
from llamaviz.plots.panels import Head
from llamaviz.notebook.runs import (
    Run, _head, _layer, _lens_labels, _resid_names, enable_offline, logit_lens_table, resid_norm_table, run, token_logprob_table,
)

_offline_ready = False
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
        from llamaviz.run import loading

        model, tok = loading.load(view["model"])
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
