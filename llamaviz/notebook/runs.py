"""Running the model for the notebook helpers: the offline renderer, Run, and the tables behind the figures."""


from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import plotly.io as pio
import torch
from plotly.io.base_renderers import NotebookRenderer

from llamaviz.interpret import readouts
from llamaviz.plots.checks import check_positive
from llamaviz.plots.panels import Head

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


