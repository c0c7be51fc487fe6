"""Handlers of the explain, compare & patch and steer tabs.

Each returns a dict naming what it updates ({"dla": figure, "status": html}); `outputs` turns it into
the tuple Gradio expects for a list of component keys, gr.skip() for anything left out. Bad input
and errors become a message in the status line; the model is locked only while a forward runs.
"""

from __future__ import annotations

import functools
import time

import gradio as gr
import plotly.graph_objects as go

from llamaviz.plots import analysis as figures
from llamaviz.plots.html import save_html
from llamaviz.plots.tokens import position_labels

from llamaviz.app import compare, explain, export, steer, views
from llamaviz.app.handlers import current_run, failure, status
from llamaviz.app.state import BrowserState

FLOW_THRESHOLD = 0.04
FLOW_CHOICES = 60  # edges listed in the flow picker (the strongest first)


def outputs(fn, keys: list[str]):
    """Wrap a handler returning a dict into one returning a tuple in the order of `keys`."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        result = fn(*args, **kwargs)
        unknown = set(result) - set(keys)
        if unknown:
            raise KeyError(f"{fn.__name__} returned {sorted(unknown)}, which are not among its outputs {keys}")
        values = tuple(result.get(key, gr.skip()) for key in keys)
        return values[0] if len(keys) == 1 else values  # one output takes its value, not a 1-tuple

    return call


def guarded(fn):
    """Turn any exception of a handler into {"status": the message}: the app keeps serving."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except compare.Stopped:
            return {"status": status("Stopped: the patching sweep ended early; its partial results are dropped.")}
        except Exception as err:
            return {"status": failure(err)}

    return call


# ---------------------------------------------------------------- the token to explain


def after_run(state, bench, foil):
    """After a generation that made a new run: the picker lists its tokens (the last generated one picked) and
    the logit attribution of that token is drawn. Leaves the status line alone (it reports the generation)."""
    if not isinstance(state, BrowserState) or state.run is None or not isinstance(bench, compare.Workbench):
        return {}
    run = state.run
    if bench.explained_run == run.run_id:  # the generation failed or was refused: nothing new to explain
        return {}
    bench.explained_run = run.run_id
    choices = explain.token_choices(run)
    index = explain.default_index(run, choices)
    shown = {"explain_token": gr.update(choices=choices, value=index)}
    try:
        return {**shown, "dla": explain.dla_figure(run, index, foil)}
    except Exception as err:
        return {**shown, "status": failure(err)}


def clicked(text) -> str:
    """A click relayed by assets/app.js, "what:when", without its timestamp."""
    return str(text or "").rsplit(":", 1)[0]


@guarded
def pick_clicked(state, text, foil):
    """A token clicked in the Tokens tab or an attention row: pick it and draw its logit attribution."""
    run = current_run(state)
    index = explain.check_index(run, clicked(text))
    return {"explain_token": index, **draw_dla(state, index, foil)}


@guarded
def highlight_attention(state, index, layer, head, mean, drop_first, log_scale):
    """The attention heatmap with the query row that predicts the picked token outlined."""
    run = current_run(state)
    row = explain.check_index(run, index) - 1  # the position the explanations read
    base = views.attention_figure(run, layer, "mean" if mean else head, drop_first, log_scale)
    figure = go.Figure(base)  # a copy: the memoised figure stays as it was
    shown = row - (1 if drop_first else 0)
    if shown >= 0:
        figure.add_hrect(y0=shown - 0.5, y1=shown + 0.5, line={"color": "#f59e0b", "width": 2},
                         fillcolor="rgba(0,0,0,0)", layer="above")
    return {"attention": figure}


@guarded
def draw_dla(state, index, foil):
    run = current_run(state)
    started = time.perf_counter()
    figure = explain.dla_figure(run, index, foil)
    return {"dla": figure, "status": status(f"Logit attribution drawn in {time.perf_counter() - started:.2f} s.", "ok")}


@guarded
def draw_saliency(state, index, method):
    run = current_run(state)
    started = time.perf_counter()
    page = explain.saliency_html(run, index, method)
    return {"saliency": page, "status": status(f"{method} in {time.perf_counter() - started:.1f} s.", "ok")}


@guarded
def draw_flow(state, index, threshold):
    run = current_run(state)
    graph = explain.flow_graph(run, index, threshold)
    ranked = sorted(range(len(graph.edges)), key=lambda i: -graph.edges[i].share)[:FLOW_CHOICES]
    labels = position_labels(run.cached_tokens)
    edges = [(f"edge {i}: " + _edge_name(graph.edges[i], labels), f"edge:{i}") for i in ranked]
    layers = run.entry.config.num_hidden_layers
    nodes = [(f"node: {'final' if layer == layers else f'entering L{layer}'} · {labels[p]}", f"node:{layer}:{p}")
             for layer, p in graph.nodes]
    note = f"{len(graph.edges)} edges, {len(graph.nodes)} nodes"
    return {"flow": explain.flow_figure(run, index, threshold), "flow_pick": gr.update(choices=edges + nodes, value=None),
            "flow_detail": "", "status": status(f"Information flow: {note}.", "ok")}


def _edge_name(edge, labels) -> str:
    via = f"L{edge.layer}H{edge.head}" if edge.kind == "attn" else f"L{edge.layer} {edge.kind}"
    return f"{via} {labels[edge.source]} → {labels[edge.target]} ({edge.share:.3f})"


@guarded
def flow_pick(state, index, threshold, picked):
    """What a picked edge or node writes: the tokens it promotes and suppresses."""
    run = current_run(state)
    if not picked:
        return {"flow_detail": ""}
    kind, *where = str(picked).split(":")
    chosen = {"edge": where[0]} if kind == "edge" else {"layer": where[0], "position": where[1]}
    return {"flow_detail": explain.flow_detail(run, index, threshold, chosen)}


def flow_clicked(state, index, threshold, text):
    """A node or edge clicked in the flow graph (relayed as "edge:3" / "node:12:4")."""
    return flow_pick(state, index, threshold, clicked(text))


# ---------------------------------------------------------------- compare & patch


def load_example():
    """The indirect-object pair: clean prompt (no chat template), corrupted prompt, answer, wrong answer."""
    e = compare.IOI_EXAMPLE
    return {"prompt": e["prompt"], "chat": False, "corrupt": e["corrupted"], "answer": e["answer"],
            "wrong": e["wrong"], "status": status("Loaded the indirect-object example: press Generate, then Run "
                                                  "patching.", "ok")}


@guarded
def run_patching(state, bench, corrupted, answer, wrong, mode, sweeps=tuple(compare.pairs.SWEEPS),
                 progress=gr.Progress()):
    run = current_run(state)
    if not isinstance(bench, compare.Workbench):
        raise ValueError("this page lost its workbench state; reload the page")
    started = time.perf_counter()
    compare.run_patching(bench, run, corrupted, answer, wrong, mode,
                         progress=lambda share, text: progress(share, desc=text), sweeps=sweeps)
    took = time.perf_counter() - started
    shown, missing = {}, []
    for key, draw in (("patch_blocks", compare.block_figure), ("patch_heads", compare.head_figure)):
        try:
            shown[key] = draw(bench, mode)
        except ValueError:  # exact mode without that sweep ticked
            missing.append("the block maps" if key == "patch_blocks" else "the head map")
    note = f"; {' and '.join(missing)} did not run (tick the sweep, or choose both)" if missing else ""
    return {**shown, "patch_summary": compare.summary(bench), "patch_tokens": compare.tokenizations(bench),
            "status": status(f"Patched in {took:.1f} s ({mode}){note}.", "ok")}


def stop_patching(bench):
    if not isinstance(bench, compare.Workbench) or not bench.running:
        return {"status": status("No patching sweep is running.")}
    bench.stop.set()
    return {"status": status("Stopping the patching sweep…")}


@guarded
def draw_diff(state, bench, layer, head):
    run = current_run(state)
    attention, lens = compare.diff_figures(bench, run, layer, head)
    return {"diff_attention": attention, "diff_lens": lens}


@guarded
def patch_one(state, bench, name, positions):
    run = current_run(state)
    if not isinstance(bench, compare.Workbench):
        raise ValueError("this page lost its workbench state; reload the page")
    return {"patch_one_result": compare.patch_one(bench, run, name, positions)}


@guarded
def export_patching(state, bench):
    run = current_run(state)
    paths = compare.export_result(bench, export.run_folder(run))
    return {"patch_file": [str(p) for p in paths],
            "status": status("Saved patching.safetensors and patching.json: download them below.", "ok")}


ANALYSIS_FIGURES = ("logit attribution", "information flow", "patching blocks", "patching heads")


def analysis_figure(state, bench, which, index, foil, threshold, mode, static: bool):
    """One of ANALYSIS_FIGURES for the current run: plotly, or a matplotlib twin when `static`."""
    run = current_run(state)
    if which == "logit attribution":
        if static:
            result = explain.logit_attribution(run, index, foil)
            return figures.dla_bars_mpl(result.labels, result.components, explain.dla_title(run, result))
        return explain.dla_figure(run, index, foil)
    if which == "information flow":
        if static:
            raise ValueError("the information-flow graph exports as HTML only")
        return explain.flow_figure(run, index, threshold)
    if which in ("patching blocks", "patching heads"):
        if not isinstance(bench, compare.Workbench) or bench.result is None:
            raise ValueError("run patching first: there is no patching result to export")
        if not static:
            return compare.block_figure(bench, mode) if which == "patching blocks" else compare.head_figure(bench, mode)
        if which == "patching heads":
            values, how = compare.shown_map(bench.result, "heads", mode)
            return figures.heatmap_mpl(values, f"heads ({how})")
        values, how = compare.shown_map(bench.result, "resid_pre", mode)
        return figures.heatmap_mpl(values, f"resid_pre ({how})", bench.tokens)
    raise ValueError(f"unknown figure {which!r}; accepted: {', '.join(ANALYSIS_FIGURES)}")


@guarded
def export_analysis(state, bench, which, fmt, index, foil, threshold, mode):
    run = current_run(state)
    figure = analysis_figure(state, bench, which, index, foil, threshold, mode, static=fmt == "png")
    path = export.run_folder(run) / f"{which.replace(' ', '-')}.{fmt}"
    if fmt == "html":
        save_html(figure, path)
    else:
        figure.savefig(path, dpi=150)
    return {"analysis_file": str(path), "status": status(f"Saved {path.name}: download it below.", "ok")}


# ---------------------------------------------------------------- steer


@guarded
def run_steer(state, source, layer, coefficient, plus, minus, head, index):
    run = current_run(state)
    result = steer.run_steering(run, source, layer, coefficient, plus, minus, head, index)
    return {"steer_output": steer.steered_html(result),
            "status": status(f"Steered at L{result.layer} with coefficient {result.coefficient:g}.", "ok")}
