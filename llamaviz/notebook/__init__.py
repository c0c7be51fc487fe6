"""One-call helpers for notebooks: run the model on a text and get a figure back.

Figures render offline: on first use inside IPython the helpers switch plotly to a renderer that
inlines plotly.js into the notebook once (no CDN) and gives each figure both plotly's mimetype
and HTML, which Jupyter, VS Code and nbconvert's static HTML export all display. `save_html`
writes a standalone page with plotly.js inlined; `open_view` reopens a view file saved by the
web app, `open_patching` a patching export.

May import: every layer below the faces (llama .. graphs) and plots. Inside: runs <- attention,
views, explain, features (show_features, show_feature, steer); this file only re-exports.
"""

from llamaviz.notebook.attention import (show_attention, show_head_grid, show_logit_lens, show_resid_norms,
                                         show_tokens)
from llamaviz.notebook.features import feature_table, show_feature, show_features, steer
from llamaviz.notebook.graphs import show_graph
from llamaviz.notebook.explain import open_patching, show_dla, show_flow, show_patching, show_saliency
from llamaviz.notebook.runs import (LONG_PREFILL, OFFLINE_RENDERERS, OfflineNotebookRenderer, Run, _resid_names,
                                    encode, enable_offline, logit_lens_table, resid_norm_table, run,
                                    token_logprob_table)
from llamaviz.notebook.views import VIEW_MAX_BYTES, VIEW_MAX_TOP_K, VIEW_SETTINGS, View, open_view, read_view
from llamaviz.plots.html import save_html

__all__ = ["LONG_PREFILL", "OFFLINE_RENDERERS", "OfflineNotebookRenderer", "Run", "View", "VIEW_MAX_BYTES",
           "VIEW_MAX_TOP_K", "VIEW_SETTINGS", "encode", "enable_offline", "logit_lens_table", "open_patching",
           "open_view", "read_view", "resid_norm_table", "run", "save_html", "show_attention", "show_dla",
           "show_flow", "show_head_grid", "show_logit_lens", "show_patching", "show_resid_norms",
           "show_saliency", "show_tokens", "token_logprob_table", "feature_table", "show_feature", "show_features",
           "steer", "show_graph"]
