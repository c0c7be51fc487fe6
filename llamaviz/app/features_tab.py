"""The Features tab: pick a dictionary, see the features active at a token, a feature's shading of the text
and its dashboard, steer, ablate and attribute by feature, export what is shown (numbers: app/features.py)."""

from __future__ import annotations

import html
import time

import gradio as gr

from llamaviz.app import features as fx
from llamaviz.app.handlers import current_run, failure, status
from llamaviz.app.workbench import guarded, outputs


def tab(c: dict, model_path: str | None) -> None:
    with gr.Tab("Features", id="features", elem_id="tab-features"):
        gr.Markdown("A dictionary (a SAELens folder: sparse autoencoder or transcoder) explains the run in "
                    "features. It is attached with its error term, so the run's numbers stay the model's own "
                    "until a feature is edited.")
        with gr.Row():
            c["feature_dictionary"] = gr.Dropdown(fx.found_dictionaries(model_path), label="Dictionary",
                                                  allow_custom_value=True, elem_id="feature-dictionary", scale=4)
            c["feature_position"] = gr.Number(-1, label="Token position (-1 = last)", precision=0,
                                              elem_id="feature-position", scale=1)
            c["feature_index"] = gr.Number(0, label="Feature", precision=0, elem_id="feature-index", scale=1)
            c["feature_show"] = gr.Button("Show", variant="primary", elem_id="feature-show")
        c["feature_list"] = gr.HTML(elem_id="feature-list")
        with gr.Row():
            c["feature_search"] = gr.Textbox(label="Search: a word of the text (empty = the picked token), or a token",
                                             elem_id="feature-search", scale=4)
            c["feature_search_word"] = gr.Button("Features firing on it", elem_id="feature-search-word", scale=1)
            c["feature_search_token"] = gr.Button("Features promoting it", elem_id="feature-search-token", scale=1)
        c["feature_search_results"] = gr.HTML(elem_id="feature-search-results")
        c["feature_text"] = gr.HTML(elem_id="feature-text")
        c["feature_dashboard"] = gr.HTML(elem_id="feature-dashboard")
        with gr.Row():
            c["feature_scale"] = gr.Number(8.0, label="Steer: multiple of the decoder row", elem_id="feature-scale")
            c["feature_steer"] = gr.Button("Steer", elem_id="feature-steer")
        c["feature_steered_text"] = gr.HTML(elem_id="feature-steered-text")
        with gr.Row():
            c["feature_ablate_list"] = gr.Textbox(label="Ablate features (e.g. 12, 40)", elem_id="feature-ablate-list")
            c["feature_ablate_positions"] = gr.Textbox(label="at positions (empty = all)",
                                                       elem_id="feature-ablate-positions")
            c["feature_ablate"] = gr.Button("Ablate", elem_id="feature-ablate")
        c["feature_ablation"] = gr.HTML(elem_id="feature-ablation")
        c["feature_attribute"] = gr.Button("Attribute the answer to features", elem_id="feature-attribute")
        c["feature_attribution"] = gr.HTML(elem_id="feature-attribution")
        c["feature_export"] = gr.Button("Export what is shown (JSON)", elem_id="feature-export")
        c["feature_file"] = gr.File(label="Exported", elem_id="feature-file")


def _numbers(text: str) -> list[int]:
    try:
        return [int(part) for part in str(text or "").replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{text!r}: give whole numbers separated by commas, e.g. 12, 40") from None


@guarded
def show(state, path, position, feature):
    run = current_run(state)
    started = time.perf_counter()
    listing = fx.feature_list_html(run, path, position)
    rows = fx.top_features(run, path, position)
    feature = rows[0][0] if rows and (feature is None or int(feature) == 0) else feature
    return {"feature_list": listing, "feature_index": feature, "feature_text": fx.text_html(run, path, feature),
            "feature_dashboard": fx.dashboard_html(run, path, feature),
            "status": status(f"Features of the run in {time.perf_counter() - started:.1f} s.", "ok")}


def search(state, path, query, position, kind: str) -> dict:
    """Features firing on a word (kind "word") or promoting a token ("token"); a bad query is shown in the results."""
    try:
        run = current_run(state)
        page = fx.search_html(run, path, kind, query, position)
    except (ValueError, FileNotFoundError) as err:
        return {"feature_search_results": f'<p class="lv-error">{html.escape(str(err), quote=False)}</p>',
                "status": failure(err)}
    return {"feature_search_results": page, "status": status("Searched.", "ok")}


@guarded
def search_word(state, path, query, position):
    return search(state, path, query, position, "word")


@guarded
def search_token(state, path, query):
    return search(state, path, query, None, "token")


@guarded
def steer(state, path, feature, scale, position):
    run = current_run(state)
    plain, pushed = fx.steered(run, path, feature, scale, position)
    page = (f'<div class="lv-steer"><p><b>plain</b>: {_esc(plain)}</p>'
            f"<p><b>steered (feature {int(feature)} x {float(scale):g})</b>: {_esc(pushed)}</p></div>")
    return {"feature_steered_text": page, "status": status("Steered.", "ok")}


def _esc(text: str) -> str:
    return html.escape(text)


@guarded
def ablate(state, path, chosen, positions, position):
    run = current_run(state)
    result = fx.ablation(run, path, _numbers(chosen), _numbers(positions), position)
    state.feature_shown = {"ablation": result}
    tops = lambda rows: ", ".join(f"{_esc(t)} ({v:.2f})" for t, v in rows)  # noqa: E731
    page = (f"<p>answer {_esc(result['answer'])}: logit {result['before']:.3f} -> {result['after']:.3f} "
            f"({result['after'] - result['before']:+.3f})</p><p>top before: {tops(result['top before'])}</p>"
            f"<p>top after: {tops(result['top after'])}</p>")
    return {"feature_ablation": page, "status": status("Ablated.", "ok")}


@guarded
def attribute(state, path, position):
    run = current_run(state)
    rows = fx.attribution(run, path, position)
    state.feature_shown = {"attribution": rows}
    body = "".join(f"<tr><td>{r['feature']}</td><td>{r['position']}</td><td>{r['estimate']:+.4f}</td>"
                   f"<td>{'' if 'exact' not in r else format(r['exact'], '+.4f')}</td></tr>" for r in rows)
    page = ("<table><tr><th>feature</th><th>position</th><th>estimate (act x grad)</th><th>exact ablation</th></tr>"
            f"{body}</table>")
    return {"feature_attribution": page, "status": status("Attributed.", "ok")}


@guarded
def export(state, path, position, feature):
    run = current_run(state)
    payload = {"dictionary": path, "position": position, "feature": feature,
               "active": fx.top_features(run, path, position), **getattr(state, "feature_shown", {})}
    return {"feature_file": fx.export(run, f"{run.run_id}", payload), "status": status("Exported.", "ok")}


def wire(state, c: dict) -> None:
    def click(event, fn, inputs, keys):
        event(outputs(fn, keys), [state, *[c[k] for k in inputs]], [c[k] for k in keys])

    click(c["feature_show"].click, show, ["feature_dictionary", "feature_position", "feature_index"],
          ["feature_list", "feature_index", "feature_text", "feature_dashboard", "status"])
    click(c["feature_search_word"].click, search_word, ["feature_dictionary", "feature_search", "feature_position"],
          ["feature_search_results", "status"])
    click(c["feature_search_token"].click, search_token, ["feature_dictionary", "feature_search"],
          ["feature_search_results", "status"])
    click(c["feature_steer"].click, steer, ["feature_dictionary", "feature_index", "feature_scale", "feature_position"],
          ["feature_steered_text", "status"])
    click(c["feature_ablate"].click, ablate, ["feature_dictionary", "feature_ablate_list", "feature_ablate_positions",
                                              "feature_position"], ["feature_ablation", "status"])
    click(c["feature_attribute"].click, attribute, ["feature_dictionary", "feature_position"],
          ["feature_attribution", "status"])
    click(c["feature_export"].click, export, ["feature_dictionary", "feature_position", "feature_index"],
          ["feature_file", "status"])
