"""The terminal side: AttentionMaskVisualizer and the pure renderers it (and the web app) draw with.

May import: llamaviz.llama, checkpoints, tokenizers, run, interpret, plots (token labels)."""

from llamaviz.terminal.colors import resolve_palette, wants_color
from llamaviz.terminal.render import MASKED, MAY_ATTEND, PADDING, SHADES, render_html, render_mask, render_plain, render_weights
from llamaviz.terminal.visualizer import AttentionMaskVisualizer

__all__ = ["AttentionMaskVisualizer", "render_mask", "render_weights", "render_plain", "render_html",
           "resolve_palette", "wants_color", "MAY_ATTEND", "MASKED", "PADDING", "SHADES"]
