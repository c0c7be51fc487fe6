"""Figures of attention, the logit lens and token log-probabilities: plotly figures, their
matplotlib twins (`*_mpl`, for PNG/SVG/PDF export) and an HTML token view. All are pure
functions of tensors + token strings; see plots.tokens for how tokens are displayed.
Per-head scores for head_overview come from llamaviz.interpret.detectors (detect_heads, head_entropy).
May import: every layer below the faces (llama .. graphs). Nothing here runs a model for itself
except to read a lazy pattern it is handed."""

from llamaviz.plots.figures import (attention_heatmap, attention_window, head_grid, head_overview, logit_lens,
                      panel_grid, pooled_attention_heatmap, resid_norms, token_logprobs)
from llamaviz.plots.pooling import max_pool, pattern_reader, pooled_pattern
from llamaviz.plots.html import tokens_html
from llamaviz.plots.static import (attention_heatmap_mpl, head_grid_mpl, head_overview_mpl, logit_lens_mpl,
                     panel_grid_mpl, pooled_attention_heatmap_mpl,
                     resid_norms_mpl, token_logprobs_mpl)
from llamaviz.plots.tokens import display_token, position_labels

__all__ = [
    "attention_heatmap", "attention_heatmap_mpl", "panel_grid_mpl", "pooled_attention_heatmap_mpl", "attention_window", "pooled_attention_heatmap",
    "panel_grid", "max_pool", "pattern_reader", "pooled_pattern", "head_grid", "head_grid_mpl", "head_overview",
    "head_overview_mpl", "logit_lens", "logit_lens_mpl", "resid_norms", "resid_norms_mpl",
    "token_logprobs", "token_logprobs_mpl", "tokens_html",
    "display_token", "position_labels",
]
