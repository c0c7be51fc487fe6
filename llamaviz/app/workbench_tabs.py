"""Layout and wiring of the workbench: the token picker, Logit attribution, Input attribution,
Information flow, Compare & patch and Steer tabs (handlers in llamaviz.app.workbench)."""

from __future__ import annotations

import gradio as gr

from llamaviz.app import compare, explain, steer
from llamaviz.app import workbench as wb


def picker(c: dict) -> None:
    """The token every explanation view explains (filled after each generation)."""
    with gr.Row():
        c["explain_token"] = gr.Dropdown([], label="Token to explain", elem_id="explain-token", scale=3,
                                         info="any token of prompt + continuation (the last generated one after "
                                              "Generate); the views explain it from the position before it")
        c["foil"] = gr.Textbox(label="Against (optional)", placeholder="a second token, e.g. ' John', or #1234",
                               elem_id="dla-foil", scale=2, info="the logit attribution then explains the difference")
    c["explain_click"] = relay("explain-click")


def relay(elem_id: str) -> gr.Textbox:
    """A hidden textbox that assets/app.js writes a click into (a token, a flow node or edge)."""
    return gr.Textbox(elem_id=elem_id, elem_classes=["lv-hidden"], container=False, show_label=False)


def tabs(c: dict) -> None:
    """The five tabs, appended inside the page's gr.Tabs."""
    with gr.Tab("Logit attribution", id="dla", elem_id="tab-dla"):
        gr.Markdown("What each piece of the residual stream adds to the picked token's logit (after the final "
                    "norm's scale): the embedding, each layer's attention and MLP, each head, and the accumulated "
                    "residual layer by layer. Hover for exact values.")
        c["dla"] = gr.Plot(label="Direct logit attribution", elem_id="dla-plot")
    with gr.Tab("Input attribution", id="saliency", elem_id="tab-saliency"):
        with gr.Row():
            c["saliency_method"] = gr.Radio(list(explain.METHODS), value="integrated gradients", label="Method",
                                            elem_id="saliency-method")
            c["saliency_run"] = gr.Button("Attribute", variant="primary", elem_id="saliency-run")
        c["saliency"] = gr.HTML(elem_id="saliency")
    with gr.Tab("Information flow", id="flow", elem_id="tab-flow"):
        with gr.Row():
            c["flow_threshold"] = gr.Slider(0.0, 0.5, value=wb.FLOW_THRESHOLD, step=0.01, label="Threshold (share)",
                                            elem_id="flow-threshold")
            c["flow_run"] = gr.Button("Draw the graph", variant="primary", elem_id="flow-run")
        c["flow"] = gr.Plot(label="Contribution graph (layers x positions)", elem_id="flow-graph")
        c["flow_pick"] = gr.Dropdown([], label="Pick an edge or node: what does it write?", elem_id="flow-pick")
        c["flow_detail"] = gr.HTML(elem_id="flow-detail")
        c["flow_click"] = relay("flow-click")
    _compare_tab(c)
    _steer_tab(c)


def _compare_tab(c: dict) -> None:
    with gr.Tab("Compare & patch", id="compare", elem_id="tab-compare"):
        gr.Markdown("The prompt of the last generation is the clean run. Type a corrupted prompt of the same "
                    "token length and the answer / wrong answer tokens: the heatmaps show how much of the clean "
                    "logit difference each patched activation restores (1 = clean, 0 = corrupted).")
        with gr.Row():
            c["corrupt"] = gr.Textbox(label="Corrupted prompt", elem_id="corrupt-prompt", scale=4)
            c["example"] = gr.Button("Indirect-object example", elem_id="ioi-example", scale=1)
        with gr.Row():
            c["answer"] = gr.Textbox(label="Answer", placeholder=" Mary", elem_id="answer")
            c["wrong"] = gr.Textbox(label="Wrong answer", placeholder=" John", elem_id="wrong-answer")
            c["patch_mode"] = gr.Radio(list(compare.MODES), value="both", label="Patching", elem_id="patch-mode",
                                       info="exact sweeps, attribution patching (one backward: fast), or both")
            c["patch_sweeps"] = gr.CheckboxGroup(list(compare.pairs.SWEEPS), value=["resid_pre", "heads"],
                                                 label="Exact sweeps", elem_id="patch-sweeps",
                                                 info="the others show the attribution estimate")
        with gr.Row():
            c["patch_run"] = gr.Button("Run patching", variant="primary", elem_id="patch-run", scale=3)
            c["patch_stop"] = gr.Button("Stop", variant="stop", elem_id="patch-stop", scale=1)
        c["patch_summary"] = gr.Textbox(label="Logit differences", interactive=False, elem_id="patch-summary")
        c["patch_tokens"] = gr.Textbox(label="Tokenizations", interactive=False, lines=2, elem_id="patch-tokens")
        c["patch_blocks"] = gr.Plot(label="resid_pre, attn_out, mlp_out", elem_id="patch-blocks")
        c["patch_heads"] = gr.Plot(label="Per head", elem_id="patch-heads")
        with gr.Column(elem_id="diff-view"):
            with gr.Row():
                c["diff_layer"] = gr.Number(0, label="Layer", precision=0, elem_id="diff-layer", minimum=0)
                c["diff_head"] = gr.Number(0, label="Head", precision=0, elem_id="diff-head", minimum=0)
                c["diff_run"] = gr.Button("Side by side", elem_id="diff-run")
            c["diff_attention"] = gr.Plot(label="Attention: clean, corrupted, difference", elem_id="diff-attention")
            c["diff_lens"] = gr.Plot(label="Logit lens of the logit difference", elem_id="diff-lens")
        with gr.Accordion("Intervene: one activation from the corrupted run", open=False, elem_id="patch-one"):
            with gr.Row():
                c["patch_one_name"] = gr.Textbox(label="Hook point", placeholder="blocks.12.hook_resid_pre",
                                                 elem_id="patch-one-name")
                c["patch_one_positions"] = gr.Textbox(label="Positions (empty = all)", placeholder="9",
                                                      elem_id="patch-one-positions")
                c["patch_one_run"] = gr.Button("Patch", elem_id="patch-one-run")
            c["patch_one_result"] = gr.Textbox(label="Result", interactive=False, elem_id="patch-one-result")
        with gr.Row():
            c["analysis_which"] = gr.Dropdown(list(wb.ANALYSIS_FIGURES), value="patching blocks", label="Figure",
                                              elem_id="analysis-figure")
            c["analysis_png"] = gr.Button("PNG", elem_id="analysis-png")
            c["analysis_html"] = gr.Button("HTML (standalone)", elem_id="analysis-html")
            c["patch_export"] = gr.Button("Patching results (.safetensors + .json)", elem_id="patch-export")
        c["analysis_file"] = gr.File(label="Figure", interactive=False, elem_id="analysis-file")
        c["patch_file"] = gr.File(label="Patching results", interactive=False, file_count="multiple",
                                  elem_id="patch-file")


def _steer_tab(c: dict) -> None:
    with gr.Tab("Steer", id="steer", elem_id="steer"):
        gr.Markdown("Add a vector to the residual stream (resid_pre of one layer, every position) and continue "
                    "the last prompt: the plain and the steered continuations side by side, same seed.")
        with gr.Row():
            c["steer_source"] = gr.Radio(list(steer.SOURCES), value="contrast prompts", label="Vector",
                                         elem_id="steer-source")
            c["steer_layer"] = gr.Number(6, label="Layer", precision=0, elem_id="steer-layer")
            c["steer_coefficient"] = gr.Number(4.0, label="Coefficient", elem_id="steer-coefficient")
        with gr.Row():
            c["steer_plus"] = gr.Textbox(label="Toward", placeholder="Love", elem_id="steer-plus")
            c["steer_minus"] = gr.Textbox(label="Away from", placeholder="Hate", elem_id="steer-minus")
            c["steer_head"] = gr.Textbox(label="Head (for head output)", placeholder="3.1", elem_id="steer-head")
        c["steer_run"] = gr.Button("Generate steered", variant="primary", elem_id="steer-run")
        c["steer_output"] = gr.HTML(elem_id="steer-output")


def _click(event, fn, inputs: list, keys: list[str], c: dict, **options):
    """event(fn) with fn's dict result mapped onto the components named by `keys`."""
    return event(wb.outputs(fn, keys), inputs, [c[k] for k in keys], **options)


def wire(state, bench, c: dict, generation) -> None:
    """Connect the workbench's events; `generation` is the Generate event the picker and DLA follow."""
    picked = [state, c["explain_token"]]
    dla_in, dla_out = [*picked, c["foil"]], ["dla", "status"]
    _click(generation.then, wb.after_run, [state, bench, c["foil"]], ["explain_token", *dla_out], c)
    _click(c["explain_token"].input, wb.draw_dla, dla_in, dla_out, c)
    _click(c["foil"].submit, wb.draw_dla, dla_in, dla_out, c)
    view = [c["layer"], c["head"], c["mean"], c["drop_first"], c["log_scale"]]
    _click(c["explain_token"].change, wb.highlight_attention, [*picked, *view], ["attention", "status"], c,
           queue=False, show_progress="hidden")
    _click(c["explain_click"].input, wb.pick_clicked, [state, c["explain_click"], c["foil"]],
           ["explain_token", *dla_out], c)
    _click(c["saliency_run"].click, wb.draw_saliency, [*picked, c["saliency_method"]], ["saliency", "status"], c)
    flow_in = [*picked, c["flow_threshold"]]
    _click(c["flow_run"].click, wb.draw_flow, flow_in, ["flow", "flow_pick", "flow_detail", "status"], c)
    _click(c["flow_threshold"].release, wb.draw_flow, flow_in, ["flow", "flow_pick", "flow_detail", "status"], c)
    _click(c["flow_pick"].input, wb.flow_pick, [*flow_in, c["flow_pick"]], ["flow_detail", "status"], c)
    _click(c["flow_click"].input, wb.flow_clicked, [*flow_in, c["flow_click"]], ["flow_detail", "status"], c)

    _click(c["example"].click, wb.load_example, [], ["prompt", "chat", "corrupt", "answer", "wrong", "status"], c)
    patch_out = ["patch_blocks", "patch_heads", "patch_summary", "patch_tokens", "status"]
    _click(c["patch_run"].click, wb.run_patching,
           [state, bench, c["corrupt"], c["answer"], c["wrong"], c["patch_mode"], c["patch_sweeps"]], patch_out, c)
    _click(c["patch_stop"].click, wb.stop_patching, [bench], ["status"], c, queue=False)
    _click(c["diff_run"].click, wb.draw_diff, [state, bench, c["diff_layer"], c["diff_head"]],
           ["diff_attention", "diff_lens", "status"], c)
    _click(c["patch_one_run"].click, wb.patch_one, [state, bench, c["patch_one_name"], c["patch_one_positions"]],
           ["patch_one_result", "status"], c)
    figure_in = [state, bench, c["analysis_which"]]
    options = [c["explain_token"], c["foil"], c["flow_threshold"], c["patch_mode"]]
    for fmt in ("png", "html"):
        _click(c[f"analysis_{fmt}"].click, lambda *a, fmt=fmt: wb.export_analysis(*a[:3], fmt, *a[3:]),
               [*figure_in, *options], ["analysis_file", "status"], c)
    _click(c["patch_export"].click, wb.export_patching, [state, bench], ["patch_file", "status"], c)
    _click(c["steer_run"].click, wb.run_steer,
           [state, c["steer_source"], c["steer_layer"], c["steer_coefficient"], c["steer_plus"], c["steer_minus"],
            c["steer_head"], c["explain_token"]], ["steer_output", "status"], c)
