"""Bytes the app sends to the page per figure, on a run of ~431 positions of the default model.

    .venv/bin/python benchmarks/app_payload.py [--positions 431]

Each figure is serialised as gr.Plot does it (plotly's Figure.to_json); the table lists the JSON
size of every view a redraw sends. A script, not a test: the numbers go in the README.
"""

from __future__ import annotations

import argparse
import time

from llamaviz.app import handlers, models, views
from llamaviz.app.state import BrowserState
from llamaviz.checkpoints.default import default_model_path


def quiet(*args, **kwargs):
    """gr.Progress stand-in outside a request."""


def long_run(positions: int):
    """A greedy run of the default model whose activations cover `positions` positions."""
    path = str(default_model_path())
    entry = models.REGISTRY.get(path)
    words = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat. "
    prompt = words * 40
    ids = entry.tokenizer(prompt)["input_ids"][:positions - 1]
    prompt = entry.tokenizer.decode(ids)
    state = BrowserState()
    new = positions + 1 - len(entry.tokenizer(prompt)["input_ids"])
    for _ in handlers.generate(state, path, prompt, False, max(1, new), 1.0, 0, 1.0, 0, False, progress=quiet):
        pass
    return state.run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=431)
    args = parser.parse_args()
    run = long_run(args.positions)
    print(f"run: {len(run.cached_tokens)} cached positions, {run.nbytes() / 2**20:.1f} MiB accounted")
    figures = {
        "attention (one head)": lambda: views.attention_figure(run, 3, 1),
        "attention (log colours)": lambda: views.attention_figure(run, 3, 1, log_scale=True),
        "head grid (one layer)": lambda: views.head_grid_figure(run, 3),
        "head overview": lambda: views.overview_figure(run, "entropy"),
        "logit lens": lambda: views.logit_lens_figure(run),
        "residual norms": lambda: views.resid_norms_figure(run),
        "mlp": lambda: views.mlp_figure(run),
    }
    total = 0
    for name, build in figures.items():
        started = time.perf_counter()
        size = len(build().to_json())
        total += size
        print(f"{name:26s} {size / 1e6:9.3f} MB   {time.perf_counter() - started:6.2f} s (build + serialise)")
    print(f"{'all of the above':26s} {total / 1e6:9.3f} MB")
    print(f"memo kept on the run: {len(run.memo)} views")


if __name__ == "__main__":
    main()
