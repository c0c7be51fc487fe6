"""The page: a `with gr.Blocks()` layout and its `.click(fn, inputs, outputs)` wiring to handlers.

Picking a head: gr.Plot has no click event, so a "Pick a head" radio sits above the head grid, and
assets/app.js turns a click on a grid panel (plotly_click; each trace's meta holds its head) into a
click on that radio choice. Slider moves and picks redraw off the queue from the stored activations.
"""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from llamaviz.app import attention, export, features_tab, graph_tab, handlers, views, workbench_tabs
from llamaviz.app.compare import Workbench
from llamaviz.app.models import list_checkpoints, peek_config
from llamaviz.app.state import MAX_NEW_TOKENS, SESSION_TTL_S, BrowserState, release_state

ASSETS = Path(__file__).resolve().parents[2] / "assets"
TITLE = "llamaviz: look inside a Llama"
HELP = (
    "Type a prompt and press **Generate**: the continuation streams in, and the activations of the whole "
    "sequence stay in this browser tab, so the tabs below browse attention, the mask, the logit lens, token "
    "log-probabilities and MLP statistics without re-running the model. **Intervene** knocks out heads; "
    "**Export** downloads figures, the activation cache and a view file for notebooks."
)
FALLBACK_EXAMPLES = ["Plants create energy through a process known as",
                     "The capital of France is Paris. The capital of Germany is"]


def example_prompts() -> list[str]:
    """assets/examples.json (a list of prompts), or two built-in ones when it is missing."""
    try:
        prompts = json.loads((ASSETS / "examples.json").read_text(encoding="utf-8"))
        return [p for p in prompts if isinstance(p, str) and p.strip()] or FALLBACK_EXAMPLES
    except (OSError, ValueError):
        return FALLBACK_EXAMPLES


def asset(name: str) -> str:
    """A text file of assets/ ("" when missing: the page works without its extras)."""
    try:
        return (ASSETS / name).read_text(encoding="utf-8")
    except OSError:
        return ""


def theme():
    """Gradio's default theme (its fonts ship with gradio: nothing is fetched) in indigo."""
    return gr.themes.Default(primary_hue="indigo", secondary_hue="slate")


def gradio6() -> bool:
    return int(gr.__version__.split(".")[0]) >= 6


def copy_button() -> dict:
    """A copy button on a Textbox, spelled as the installed Gradio spells it."""
    return {"buttons": ["copy"]} if gradio6() else {"show_copy_button": True}


def style_arguments(where: str) -> dict:
    """css, js (a head-grid click picks the head) and theme go to launch() in Gradio 6, gr.Blocks() in 5.

    Gradio 6 also records every event's outputs (figures included) in the browser's run history, which
    slows each later event down: launch() turns it off.
    """
    style = {"css": asset("app.css"), "js": asset("app.js") or None, "theme": theme()}
    if where == "launch":
        return {**style, "run_history": False} if gradio6() else {}
    return {} if gradio6() else style


def build(model_path: str | None = None) -> gr.Blocks:
    """Build the page; `model_path` is preselected in the model list."""
    choices = list_checkpoints(preselect=model_path)
    config = peek_config(choices[0][1] if choices else None)
    shape = (config.num_hidden_layers, config.num_attention_heads) if config else (32, 32)
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600),
                   **style_arguments("blocks")) as demo:
        state = gr.State(BrowserState(), delete_callback=release_state, time_to_live=SESSION_TTL_S)
        gr.Markdown(f"# {TITLE}\n{HELP}", elem_id="intro")
        c = _controls(choices)
        c["status"] = gr.HTML(handlers.status("Loading the model…"), elem_id="status")
        bench = gr.State(Workbench())  # this page's patching results and Stop flag
        workbench_tabs.picker(c)
        with gr.Tabs(elem_id="tabs") as c["tabs"]:
            _attention_tab(c, *shape)
            _mask_tab(c)
            _lens_tab(c)
            _tokens_tab(c)
            _activations_tab(c)
            _intervene_tab(c)
            workbench_tabs.tabs(c)
            features_tab.tab(c, choices[0][1] if choices else None)
            graph_tab.tab(c, choices[0][1] if choices else None)
            _export_tab(c)
        generation = _wire(demo, state, c)
        workbench_tabs.wire(state, bench, c, generation)
        features_tab.wire(state, c)
        graph_tab.wire(state, c)
    demo.llamaviz_model_path = choices[0][1] if choices else None
    return demo


def _controls(choices) -> dict:
    """Model picker, prompt, buttons and generation settings on the left; the output on the right."""
    c = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=380):
            c["model"] = gr.Dropdown(choices=choices, value=choices[0][1] if choices else None, label="Model",
                                     info="checkpoints in model/: HF folders and .gguf files", elem_id="model")
            c["prompt"] = gr.Textbox(label="Prompt", lines=3, max_lines=12, elem_id="prompt",
                                     placeholder="Plants create energy through a process known as")
            with gr.Row():
                c["chat"] = gr.Checkbox(True, label="Chat template", info="wrap as a user turn (instruct models)",
                                        elem_id="chat-template", min_width=150)
                c["max_new"] = gr.Slider(1, MAX_NEW_TOKENS, value=32, step=1, label="Max new tokens",
                                         elem_id="max-new-tokens", min_width=200)
            with gr.Accordion("Sampling", open=False, elem_id="sampling"):
                c["sample"] = gr.Checkbox(False, label="Sample (off = greedy)", elem_id="do-sample")
                with gr.Row():
                    c["temperature"] = gr.Number(1.0, label="Temperature", minimum=0.01, maximum=5, step=0.05,
                                                 elem_id="temperature", min_width=90)
                    c["top_k"] = gr.Number(0, label="Top-k (0 = off)", minimum=0, precision=0, elem_id="top-k",
                                           min_width=90)
                    c["top_p"] = gr.Number(1.0, label="Top-p", minimum=0.01, maximum=1, step=0.05, elem_id="top-p",
                                           min_width=90)
                    c["seed"] = gr.Number(0, label="Seed", minimum=0, precision=0, elem_id="seed", min_width=90)
            with gr.Row():
                c["generate"] = gr.Button("Generate", variant="primary", elem_id="generate", scale=3)
                c["stop"] = gr.Button("Stop", variant="stop", elem_id="stop", scale=1)
        with gr.Column(scale=3):
            c["output"] = gr.Textbox(label="Prompt + continuation", lines=9, max_lines=9, interactive=False,
                                     elem_id="output", **copy_button())
            gr.Examples([[p] for p in example_prompts()], inputs=[c["prompt"]], label="Example prompts")
    return c


def _attention_tab(c: dict, layers: int, heads: int) -> None:
    with gr.Tab("Attention", id="attention", elem_id="tab-attention"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                c["attention"] = gr.Plot(label="Attention pattern", elem_id="attention-plot")
            with gr.Column(scale=2):
                c["layer"] = gr.Slider(0, layers - 1, value=0, step=1, label="Layer", elem_id="layer")
                c["head"] = gr.Slider(0, heads - 1, value=0, step=1, label="Head", elem_id="head")
                with gr.Row():
                    c["mean"] = gr.Checkbox(False, label="Mean of all heads", elem_id="mean-heads", min_width=100)
                    c["drop_first"] = gr.Checkbox(False, label="Hide first token", elem_id="drop-first",
                                                  info="the sink; rows renormalised", min_width=100)
                    c["log_scale"] = gr.Checkbox(False, label="Log colours", elem_id="log-scale", min_width=100)
                c["picker"] = gr.Radio(["mean"] + [f"H{h}" for h in range(heads)], value="H0", label="Pick a head",
                                       info="or click a panel of the grid below", elem_id="head-picker")
                c["grid"] = gr.Plot(label="All heads of the layer", elem_id="head-grid")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=220):
                c["score"] = gr.Dropdown(list(views.SCORES), value="entropy", label="Head score",
                                         elem_id="head-score")
                c["score_note"] = gr.Markdown(views.SCORE_HELP["entropy"], elem_id="score-note")
            with gr.Column(scale=3):
                c["overview"] = gr.Plot(label="Layer x head overview", elem_id="head-overview")
        _zoom_and_text_controls(c)


def _zoom_and_text_controls(c: dict) -> None:
    """Zoom into exact cells of the pattern, and read the text shaded by one token's attention."""
    with gr.Accordion("Zoom and text view", open=False, elem_id="long-views"):
        with gr.Row():
            c["zoom_q0"] = gr.Number(0, label="First query", precision=0, elem_id="zoom-q0", min_width=90)
            c["zoom_q1"] = gr.Number(63, label="Last query", precision=0, elem_id="zoom-q1", min_width=90)
            c["zoom_k0"] = gr.Number(0, label="First key", precision=0, elem_id="zoom-k0", min_width=90)
            c["zoom_k1"] = gr.Number(63, label="Last key", precision=0, elem_id="zoom-k1", min_width=90)
            c["zoom"] = gr.Button("Zoom: exact cells", elem_id="zoom")
        with gr.Row():
            c["text_position"] = gr.Number(0, label="Token position", precision=0, elem_id="text-position",
                                           info="or click a token below", min_width=120)
            c["text_direction"] = gr.Radio(list(attention.DIRECTIONS), value="attends to", label="Shade by",
                                           elem_id="text-direction")
        c["text_view"] = gr.HTML(elem_id="attention-text")


def _mask_tab(c: dict) -> None:
    with gr.Tab("Mask", id="mask", elem_id="tab-mask"):
        gr.Markdown("The causal mask of the current tokens, from `llamaviz.llama.masks.build_mask` as the "
                    "terminal prints it: `■` may attend, `⬚` masked; long sequences show the last tokens.")
        c["mask"] = gr.HTML(elem_id="mask-view", elem_classes=["lv-mask"])


def _lens_tab(c: dict) -> None:
    with gr.Tab("Logit lens", id="lens", elem_id="tab-lens"):
        c["lens_start"] = gr.Slider(0, 1, value=0, step=1, label=f"First position ({views.LENS_WIDTH} shown)",
                                    elem_id="lens-start")
        c["lens"] = gr.Plot(label="Top next token of each layer's residual stream", elem_id="logit-lens")


def _tokens_tab(c: dict) -> None:
    with gr.Tab("Tokens", id="tokens", elem_id="tab-tokens"):
        gr.Markdown("Each token coloured by its log-probability given the tokens before it; hover for the "
                    "model's top-5 predictions at that slot.")
        c["tokens"] = gr.HTML(elem_id="tokens-view")
        c["token_table"] = gr.Dataframe(label="Log-probabilities and top-5 alternatives", elem_id="tokens-table",
                                        interactive=False, wrap=True, max_height=420)


def _activations_tab(c: dict) -> None:
    with gr.Tab("Activations", id="activations", elem_id="tab-activations"):
        gr.Markdown("Residual stream norm per layer and position. The first token's norm (the attention sink) "
                    "is often far larger than the rest, so the colours stop at the largest other norm; hover a "
                    "cell for its value.")
        c["norms"] = gr.Plot(label="Residual stream norm", elem_id="resid-norms")
        c["mlp"] = gr.Plot(label="MLP activations (mlp.hook_post)", elem_id="mlp-stats")
        c["mlp_table"] = gr.Dataframe(label="MLP statistics per layer", interactive=False, max_height=320)


def _intervene_tab(c: dict) -> None:
    with gr.Tab("Intervene", id="intervene", elem_id="tab-intervene"):
        gr.Markdown("Knock out attention heads (their `hook_z` output) and rerun one forward on the current "
                    "tokens: compare the next-token distribution before and after.")
        with gr.Row():
            c["ablate_boxes"] = gr.CheckboxGroup([], label="Heads of the current layer", elem_id="ablate-heads")
            c["ablate_text"] = gr.Textbox(label="More heads (layer.head)", placeholder="3.1, 5.7",
                                          elem_id="ablate-text")
        with gr.Row():
            c["ablate_mode"] = gr.Radio(["zero", "mean"], value="zero", label="Replace by",
                                        info="zero, or the head's mean output over this sequence")
            c["target"] = gr.Textbox(label="Track token", placeholder="empty = the top prediction; ' Paris' or #1234",
                                     elem_id="ablate-target")
            c["ablate"] = gr.Button("Ablate", variant="primary", elem_id="ablate")
        c["ablate_summary"] = gr.Markdown(elem_id="ablate-summary")
        c["ablate_table"] = gr.Dataframe(label="Top-10 next tokens", interactive=False, elem_id="ablate-table")


def _export_tab(c: dict) -> None:
    with gr.Tab("Export", id="export", elem_id="tab-export"):
        with gr.Row():
            c["figure_name"] = gr.Dropdown(list(export.FIGURES), value="attention", label="Figure",
                                           elem_id="export-figure")
            c["png"] = gr.Button("PNG", elem_id="export-png")
            c["html"] = gr.Button("HTML (standalone)", elem_id="export-html")
        with gr.Row():
            c["save_cache"] = gr.Button("Activation cache (.safetensors)", elem_id="export-cache")
            c["save_view"] = gr.Button("View file (.json)", elem_id="export-view")
        c["file"] = gr.File(label="Download", elem_id="export-file", interactive=False)


def _wire(demo: gr.Blocks, state, c: dict):
    """Connect events to handlers; returns the Generate event (the workbench follows it)."""
    view = [c["layer"], c["head"], c["mean"], c["drop_first"], c["log_scale"]]
    attention_out = [c["attention"], c["picker"], c["status"]]
    layer_out = [c["grid"], c["picker"], c["ablate_boxes"], c["status"]]
    overview_out = [c["overview"], c["score_note"], c["status"]]
    tabs_out = [c["mask"], c["lens"], c["tokens"], c["token_table"], c["norms"], c["mlp"], c["mlp_table"], c["status"]]

    def forget(request: gr.Request):
        handlers.forget_session(demo, request)

    demo.unload(forget)
    load_args = dict(fn=handlers.load_model, inputs=[c["model"]], outputs=[c["status"], c["chat"]])
    demo.load(**load_args)
    c["model"].change(**load_args)
    settings = [c["chat"], c["max_new"], c["temperature"], c["top_k"], c["top_p"], c["seed"], c["sample"]]
    generation = c["generate"].click(handlers.generate, [state, c["model"], c["prompt"], *settings],
                                     [c["output"], c["status"], state], show_progress="minimal")
    c["stop"].click(handlers.stop, [state], [c["status"]], queue=False)
    run_out = [c["layer"], c["head"], c["lens_start"], c["attention"], c["picker"], c["grid"], c["ablate_boxes"],
               c["overview"], c["score_note"], c["status"]]
    (generation.then(handlers.show_run, [state, *view, c["score"]], run_out)
     .then(handlers.draw_run_tabs, [state], tabs_out))

    # user moves redraw from the stored activations only: off the queue, no spinner, the newest move wins
    quick = dict(queue=False, show_progress="hidden", trigger_mode="always_last")
    layer_in = [state, c["layer"], c["drop_first"], c["log_scale"]]
    for control in (c["layer"], c["mean"], c["drop_first"], c["log_scale"]):
        control.input(handlers.draw_attention, [state, *view], attention_out, **quick)
    for control in (c["layer"], c["drop_first"], c["log_scale"]):
        control.input(handlers.draw_layer, layer_in, layer_out, **quick)
    c["head"].input(handlers.draw_head, [state, c["layer"], c["head"], c["drop_first"], c["log_scale"]],
                    [c["attention"], c["picker"], c["mean"], c["status"]], **quick)
    c["picker"].input(handlers.pick_head, [state, c["picker"], c["layer"], c["head"], c["drop_first"], c["log_scale"]],
                      [c["attention"], c["head"], c["mean"], c["status"]], **quick)
    c["score"].change(handlers.draw_overview, [state, c["score"]], overview_out)
    zoom_in = [state, c["layer"], c["head"], c["mean"], c["zoom_q0"], c["zoom_q1"], c["zoom_k0"], c["zoom_k1"]]
    c["zoom"].click(handlers.draw_zoom, zoom_in, [c["attention"], c["status"]], **quick)
    text_in = [state, c["layer"], c["head"], c["mean"], c["text_position"], c["text_direction"]]
    for control in (c["text_position"], c["text_direction"]):
        control.change(handlers.draw_text, text_in, [c["text_view"], c["status"]], **quick)
    c["lens_start"].release(handlers.draw_lens, [state, c["lens_start"]], [c["lens"], c["status"]])
    c["tabs"].select(handlers.tab_selected, [state, c["lens_start"]], [c["lens"], c["status"]], queue=False)

    c["ablate"].click(handlers.ablate, [state, c["ablate_text"], c["ablate_boxes"], c["ablate_mode"], c["target"]],
                      [c["ablate_table"], c["ablate_summary"], c["status"]])
    options = [*view, c["score"], c["lens_start"]]
    c["png"].click(handlers.export_png, [state, c["figure_name"], *options], [c["file"], c["status"]])
    c["html"].click(handlers.export_html, [state, c["figure_name"], *options], [c["file"], c["status"]])
    c["save_cache"].click(handlers.export_cache, [state], [c["file"], c["status"]])
    c["save_view"].click(handlers.export_view, [state, *options], [c["file"], c["status"]])
    return generation
