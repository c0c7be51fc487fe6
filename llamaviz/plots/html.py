"""Tokens coloured by log-probability as an HTML fragment, for embedding in a page; figures saved as
standalone HTML pages."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.colors import sample_colorscale, unlabel_rgb

from llamaviz.plots import panels
from llamaviz.plots.panels import Alternatives, Tensor
from llamaviz.plots.tokens import display_token, escape_html

COLORSCALE = "RdYlGn"   # the same scale as plots.token_logprobs


def _background(logprob: float, zmin: float, zmax: float) -> tuple[str, str]:
    """Background and text colour of a token with this log-prob ("no value" is grey)."""
    if math.isnan(logprob):
        return "#e5e7eb", "#111827"
    share = min(1.0, max(0.0, (logprob - zmin) / (zmax - zmin)))
    background = sample_colorscale(COLORSCALE, [share])[0]
    red, green, blue = (channel / 255 for channel in unlabel_rgb(background))
    dark = 0.2126 * red + 0.7152 * green + 0.0722 * blue < 0.5
    return background, "#ffffff" if dark else "#111827"


def _span(token: str, logprob: float, alternatives: list[tuple[str, float]],
          zmin: float, zmax: float) -> str:
    """One token as a coloured <span> whose title lists the log-prob and the alternatives."""
    background, color = _background(logprob, zmin, zmax)
    title = "\n".join(panels.token_hover_lines(token, logprob, alternatives))
    shown = display_token(token)
    value = "" if math.isnan(logprob) else f' data-logprob="{logprob:.6g}"'
    span = (f'<span class="llamaviz-token" style="background:{background};color:{color};'
            f'padding:1px 2px;margin:1px;border-radius:3px;font-family:monospace;'
            f'white-space:pre" title="{escape_html(title, quote=True)}"{value}>'
            f"{escape_html(shown)}</span>")
    return span + ("<br>" if "⏎" in shown else "")


def tokens_html(tokens: Sequence[str], logprobs: Tensor, alternatives: Alternatives | None = None) -> str:
    """Tokens [p] coloured by log-probability [p] (NaN = none) as a <div>; hover shows alternatives.

    Every token string is HTML-escaped; a token holding a newline is followed by a line break."""
    tokens, values, alternatives = panels.token_logprob_inputs(tokens, logprobs, alternatives)
    zmin, zmax = panels.logprob_range(values)
    spans = [_span(token, float(value), alts, zmin, zmax)
             for token, value, alts in zip(tokens, np.asarray(values), alternatives)]
    legend = (f'<div class="llamaviz-legend" style="font-size:smaller;color:#6b7280">'
              f"colour: log-probability from {zmin:.1f} (red) to {zmax:.0f} (green); "
              f"hover a token for the top predictions</div>")
    return f'<div class="llamaviz-tokens" style="line-height:1.9">{"".join(spans)}</div>{legend}'


def save_html(fig: go.Figure, path: str | Path) -> Path:
    """Write `fig` as a standalone HTML page with plotly.js inlined (opens offline, no CDN)."""
    if not isinstance(fig, go.Figure):
        hint = "; save a matplotlib figure with fig.savefig(path)" if hasattr(fig, "savefig") else ""
        raise ValueError(f"fig must be a plotly Figure; got {type(fig).__name__}{hint}")
    path = Path(path)
    pio.write_html(fig, path, include_plotlyjs=True, include_mathjax=False, full_html=True)
    return path
