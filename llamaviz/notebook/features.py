"""Notebook helpers for dictionaries: the features active at a token, one feature's dashboard, steering.

    run = notebook.run(model, tok, text, names=[])                 # or any Run
    notebook.show_features(run, position=-1, dictionary="model/sae-10")
    notebook.show_feature("model/sae-10", 123)                     # its dashboard (needs dashboards.safetensors)
    notebook.steer(model, tok, "The cat", "model/sae-10", 123, scale=8.0)
"""

from __future__ import annotations

import html

import plotly.graph_objects as go
import torch

from llamaviz import features
from llamaviz.features import dashboards
from llamaviz.notebook.runs import Run, enable_offline


def _dictionary(dictionary):
    return features.load(dictionary) if not isinstance(dictionary, features.Dictionary) else dictionary


def feature_table(model, run: Run, dictionary, position: int = -1, top: int = 12) -> list[tuple[int, float]]:
    """[(feature, activation)] of the most active features at `position` of the run's tokens."""
    sae = _dictionary(dictionary)
    acts = dashboards.feature_acts(model, sae, run.input_ids)[0, position]  # [F]
    values, indices = acts.topk(min(top, acts.numel()))
    return [(int(i), float(v)) for v, i in zip(values, indices) if v > 0]


def show_features(model, run: Run, dictionary, position: int = -1, top: int = 12) -> go.Figure:
    """A bar chart of the features most active at `position`."""
    enable_offline()
    rows = feature_table(model, run, dictionary, position, top)
    fig = go.Figure(go.Bar(x=[f"#{f}" for f, _ in rows], y=[a for _, a in rows]))
    fig.update_layout(title=f"Features active at position {position} ({run.tokens[position]!r})",
                      xaxis_title="feature", yaxis_title="activation", template="plotly_white")
    return fig


def show_feature(dictionary_folder, index: int, tokenizer) -> str:
    """One feature's dashboard as HTML: its top contexts shaded by activation, density and logit effects."""
    board = dashboards.DashboardFile(dictionary_folder)
    data = board.feature(index)
    rows = []
    for ids, acts, value in zip(data["top_ids"], data["top_acts"], data["top_values"]):
        if value >= 0:
            pieces = [tokenizer.decode([int(i)]) for i in ids if i >= 0]
            rows.append(_shaded(pieces, acts[ids >= 0]))
    promoted = ", ".join(html.escape(tokenizer.decode([int(i)])) for i in data["promoted_ids"])
    return (f"<h4>Feature {index}</h4><p>density {float(data['density']):.3%}; promotes {promoted}</p>"
            + "".join(rows))


def _shaded(pieces: list[str], acts: torch.Tensor) -> str:
    peak = float(acts.max()) or 1.0
    return "<div>" + "".join(f'<span style="background: rgba(217, 119, 6, {float(a) / peak:.3f})">'
                             f"{html.escape(p)}</span>" for p, a in zip(pieces, acts)) + "</div>"


def steer(model, tok, text: str, dictionary, feature: int, scale: float = 8.0, max_new_tokens: int = 24) -> dict:
    """{"plain": ..., "steered": ...}: greedy continuations without and with scale x the feature's decoder row
    added at its hook on every position."""
    sae = _dictionary(dictionary)
    ids = tok(text, return_tensors="pt")["input_ids"]
    direction = float(scale) * sae.W_dec[feature].detach()
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        with model.hooks(fwd_hooks=[(sae.cfg.hook_name_out or sae.cfg.hook_name, lambda x, hook: x + direction)]):
            pushed = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return {"plain": tok.decode(plain[0, ids.shape[1]:].tolist()), "steered": tok.decode(pushed[0, ids.shape[1]:].tolist())}
