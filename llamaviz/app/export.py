"""Downloads: the current figure as PNG (its matplotlib twin) or standalone HTML, the activation cache
as safetensors, and a view file that llamaviz.notebook.open_view reopens.

Every file goes to the run's folder inside the process's private export folder (files.py) and is
created without following links.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import plotly.io as pio

from llamaviz import plots

from llamaviz.app import attention, files, views
from llamaviz.app.state import Run

FIGURES = ("attention", "head grid", "head overview", "logit lens", "tokens", "residual norms")
FORMATS = ("png", "html")


@dataclass(frozen=True)
class ViewOptions:
    """What the page shows now: the figure's settings as the export and view file record them."""

    layer: int = 0
    head: int | str = "mean"
    drop_first: bool = False
    log_scale: bool = False
    score: str = "entropy"
    lens_start: int | None = None


def run_folder(run: Run) -> Path:
    """The run's export folder (private, removed with the run's activations and at exit)."""
    return run.export_folder


def figure(run: Run, which: str, options: ViewOptions, static: bool):
    """The named figure of this run: plotly, or its matplotlib twin when `static`."""
    layer, head = views.check_layer_head(run, options.layer, options.head)
    style = {"drop_first": options.drop_first, "log_scale": options.log_scale}
    if which == "attention":
        if not static:
            return views.attention_figure(run, layer, head, **style)
        return attention.heatmap_figure(run, layer, head, **style, static=True)
    if which == "head grid":
        if not static:
            return views.head_grid_figure(run, layer, **style)
        return attention.grid_figure(run, layer, **style, static=True)
    if which == "head overview":
        if not static:
            return views.overview_figure(run, options.score)
        return plots.head_overview_mpl(views.head_scores(run, options.score), options.score)
    if which == "logit lens":
        return (plots.logit_lens_mpl(*views.lens_table(run, options.lens_start)) if static
                else views.logit_lens_figure(run, options.lens_start))
    if which == "tokens":
        return plots.token_logprobs_mpl(run.tokens, *views.token_logprobs(run)) if static else views.tokens_figure(run)
    if which == "residual norms":
        return (plots.resid_norms_mpl(*views.resid_norm_table(run)) if static
                else views.resid_norms_figure(run))
    raise ValueError(f"unknown figure {which!r}; accepted: {', '.join(FIGURES)}")


def file_stem(which: str, options: ViewOptions) -> str:
    """A file name for the figure, e.g. attention-L3-H1."""
    head = "mean" if options.head in ("mean", None, -1) else f"H{options.head}"
    suffix = {"attention": f"-L{options.layer}-{head}", "head grid": f"-L{options.layer}",
              "head overview": f"-{options.score}"}.get(which, "")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", which + suffix)


def export_figure(run: Run, which: str, fmt: str, options: ViewOptions) -> Path:
    """Write the figure as PNG (matplotlib, no browser needed) or standalone HTML (plotly.js inlined)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; accepted: {', '.join(FORMATS)}")
    path = run_folder(run) / f"{file_stem(which, options)}.{fmt}"
    if fmt == "html":  # standalone: plotly.js inlined, opens offline
        page = pio.to_html(figure(run, which, options, static=False), include_plotlyjs=True,
                           include_mathjax=False, full_html=True)
        return files.write_private(path, page.encode("utf-8"))
    image = io.BytesIO()
    static = figure(run, which, options, static=True)
    static.savefig(image, format="png", dpi=150)
    _close(static)
    return files.write_private(path, image.getvalue())


def _close(fig) -> None:
    """Free a matplotlib figure once saved (pyplot keeps every open figure otherwise)."""
    import matplotlib.pyplot as plt

    plt.close(fig)


def export_cache(run: Run) -> Path:
    """The run's ActivationCache as safetensors (ActivationCache.load reads it back)."""
    path = run_folder(run) / f"activations-run{run.run_id}.safetensors"
    files.write_private(path, b"")  # made here, a regular file of ours (a planted link is refused)
    return run.activations().save(path)


def view_dict(run: Run, options: ViewOptions) -> dict:
    """The view file's content: what llamaviz.notebook.read_view reads, plus the generation that made it."""
    head = "mean" if options.head in ("mean", None, -1) else int(options.head)
    return {
        "model": run.entry.path,
        "prompt": run.prompt,
        "seed": run.settings.seed,
        "settings": {"layer": int(options.layer), "head": head, "drop_first": options.drop_first,
                     "log_scale": options.log_scale, "top_k": 5, "score": options.score},
        "generation": asdict(run.settings),
        "model_input": run.model_input,
        "continuation": run.continuation,
        "token_ids": run.ids[0].tolist(),
    }


def export_view(run: Run, options: ViewOptions) -> Path:
    path = run_folder(run) / f"view-run{run.run_id}.json"
    text = json.dumps(view_dict(run, options), indent=2, ensure_ascii=False)
    return files.write_private(path, text.encode("utf-8"))
