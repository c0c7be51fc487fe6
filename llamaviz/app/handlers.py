"""Gradio handlers: module-level functions that check inputs, call llamaviz.app's modules, and turn
every bad input into a message in the page's status line instead of an exception.

Each returns plain values (or gr.update / gr.skip), so the tests call them without a server.
"""

from __future__ import annotations

import html
import logging
import time

import gradio as gr

from llamaviz.app import attention, export, intervene, views
from llamaviz.app.generating import Generation, encode_prompt, has_chat_template, token_budget
from llamaviz.app.models import REGISTRY
from llamaviz.app.state import BrowserState, Settings, release_state, trim_heap

log = logging.getLogger("llamaviz.app")
USER_ERRORS = (ValueError, KeyError, IndexError, MemoryError, FileNotFoundError, OSError, NotImplementedError)
NO_RUN = "Generate first: the tabs show the activations of the last generation."
WAITING_FOR_MODEL = "waiting for another user's generation to finish with the model"
STREAM_INTERVAL = 0.05  # seconds between two streamed updates of the output box


def status(message: str, kind: str = "info") -> str:
    """The status line as HTML; the message is escaped (it may quote the prompt or a file name)."""
    return f'<div class="lv-status lv-{kind}">{html.escape(message)}</div>'


def failure(err: BaseException) -> str:
    """A status line for an error; expected bad input shows its message, anything else is logged too."""
    if isinstance(err, USER_ERRORS):
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        return status(f"Error: {message}", "error")
    log.exception("unexpected error in the app", exc_info=err)
    return status(f"Internal error ({type(err).__name__}: {err}). The app keeps running; "
                  "try again or pick another model.", "error")


def current_run(state: BrowserState | None):
    """The session's last run; ValueError when there is none yet."""
    if state is None or state.run is None:
        raise ValueError(NO_RUN)
    return state.run


def head_value(head, mean: bool):
    """The head slider and the mean box as one value: an int, or "mean"."""
    return "mean" if mean or head is None else int(head)


def with_model(entry, width: int, compute):
    """Outputs of a handler whose work runs the shared model (its hooks need the model's lock).

    Yields a status saying it waits while another request holds the lock (the other `width - 1`
    outputs skipped), then compute()'s outputs. Views of a finished run never come here.
    """
    if entry.lock.locked():
        yield (*(gr.skip(),) * (width - 1), status(f"{WAITING_FOR_MODEL[0].upper()}{WAITING_FOR_MODEL[1:]}…",
                                                   "info"))
    yield compute()


# ---------------------------------------------------------------- model


def load_model(path: str, progress=gr.Progress()):
    """Load the picked checkpoint once (shared by every session): (status, chat-template checkbox)."""
    if not path:
        return status("Pick a model from the list.", "error"), gr.skip()
    try:
        started = time.perf_counter()
        entry = REGISTRY.get(path, progress=lambda share, text: progress(share, desc=text))
    except Exception as err:  # a broken checkpoint must not take the app down
        return failure(err), gr.skip()
    took = time.perf_counter() - started
    chat = has_chat_template(entry.tokenizer)
    note = " (has a chat template)" if chat else " (no chat template: the prompt is continued as is)"
    return (status(f"Ready: {entry.describe()}{note}" + (f"; loaded in {took:.1f} s" if took > 0.5 else ""), "ok"),
            gr.update(interactive=chat, value=chat))


def forget_session(demo, request) -> None:
    """demo.unload: a closed tab's run is freed and Gradio's copy of its page values (figures) dropped now,
    not an hour later."""
    holder = getattr(demo, "state_holder", None)
    session = getattr(request, "session_hash", None)
    if holder is None or session is None:
        return
    with holder.lock:
        kept = holder.session_data.pop(session, None)
        holder.time_last_used.pop(session, None)
    for value in (kept.state_data.values() if kept is not None else ()):
        release_state(value)


# ---------------------------------------------------------------- generation


def generate(state, model_path, prompt, chat_template, max_new_tokens, temperature, top_k, top_p, seed, do_sample,
             progress=gr.Progress()):
    """Stream prompt + continuation into the output box; keep the run (tokens + activations) in `state`.

    Yields (output text, status, state).
    """
    state = state if isinstance(state, BrowserState) else BrowserState()
    state.fresh = False
    try:
        settings = Settings(max_new_tokens, temperature, top_k, top_p, seed, do_sample, chat_template).checked()
        if not model_path:
            raise ValueError("pick a model first")
        entry = REGISTRY.get(model_path, progress=lambda share, text: progress(share, desc=text))
        ids, model_input = encode_prompt(entry, prompt, settings.chat_template)
        allowed, note = token_budget(entry, ids.shape[1], settings.max_new_tokens)
    except Exception as err:
        yield gr.skip(), failure(err), state
        return
    shown = prompt + ("\n\n" if model_input != prompt else "")  # a chat answer starts on its own line
    stop = state.begin()  # this Generate's own flag; a previous Generate of this page is told to stop
    generation = Generation(entry, ids, settings, allowed, stop)
    waiting = f"{WAITING_FOR_MODEL}, then " if generation.waited else ""
    yield shown, status(f"Generating: {waiting}up to {allowed} tokens after a {ids.shape[1]}-token prompt"), state
    started, last, text = time.perf_counter(), 0.0, ""
    try:
        for text, prefill in generation.updates():
            if time.perf_counter() - last >= STREAM_INTERVAL or (prefill and prefill.done == prefill.total):
                last = time.perf_counter()
                yield shown + text, prefill_status(prefill, ids.shape[1], allowed) if prefill else gr.skip(), state
        run = generation.to_run(prompt, model_input, text)
    except Exception as err:
        yield shown + text, failure(err), state
        return
    finally:
        state.finish(stop)  # also ends the worker if this generator is closed early (tab closed, cancelled)
        trim_heap()  # the forward's scratch memory goes back to the system
    if not state.is_current(stop):  # a newer Generate of this page took over: it keeps its own run
        run.release()
        yield gr.skip(), gr.skip(), state
        return
    state.replace_run(run)
    ended = "stopped" if run.stopped else "done"
    message = (f"{ended.capitalize()}: {run.new_tokens} new tokens in {time.perf_counter() - started:.1f} s; "
               f"activations of {len(run.cached_tokens)} positions kept for the tabs below")
    yield shown + text, status(message + (f". Note: {note}" if note else ""), "ok"), state


def prefill_status(prefill, prompt_length: int, allowed: int) -> str:
    """The status line while the prompt's forward passes the layers, then while tokens stream."""
    if prefill.done < prefill.total:
        return status(f"Reading the {prompt_length}-token prompt: layer {prefill.done} of {prefill.total}…")
    return status(f"Generating: up to {allowed} tokens after a {prompt_length}-token prompt")


def stop(state):
    """Ask the running generation to stop after its current token.

    The status line is left to the generation, which ends with "Stopped: ..." after that token: this event is
    not queued, so a line written here could arrive after the generation's last one and hide it.
    """
    if not isinstance(state, BrowserState) or not state.generating:
        return status("Nothing is generating.")
    state.stop.set()
    return gr.skip()


# ---------------------------------------------------------------- attention tab


def show_run(state, layer, head, mean, drop_first, log_scale, score):
    """After a generation: slider ranges for the run's model, the attention views and the overview.

    Returns (layer, head, lens start sliders, heatmap, head picker, grid, ablation boxes, overview,
    score note, status); all left as they are when no new run arrived (the status keeps its error).
    """
    if not isinstance(state, BrowserState) or not state.fresh or state.run is None:
        return (gr.skip(),) * 10
    run, config = state.run, state.run.entry.config
    layer = min(int(layer), config.num_hidden_layers - 1)
    picked = "mean" if mean else min(int(head), config.num_attention_heads - 1)
    try:
        views.warm_attention(run, layer, drop_first, log_scale)
        views.warm_lens(run)
        figures = (views.attention_figure(run, layer, picked, drop_first, log_scale),
                   views.head_grid_figure(run, layer, drop_first, log_scale), views.overview_figure(run, score))
    except Exception as err:
        return (*(gr.skip(),) * 9, failure(err))
    positions = len(run.cached_tokens)
    return (gr.update(maximum=config.num_hidden_layers - 1, value=layer),
            gr.update(maximum=config.num_attention_heads - 1, value=0 if picked == "mean" else picked),
            gr.update(maximum=max(0, positions - 1), value=max(0, positions - views.LENS_WIDTH)),
            figures[0], gr.update(choices=head_choices(config), value=picker_value(picked)), figures[1],
            gr.update(choices=intervene.heads_of_layer(config, layer), value=[]), figures[2],
            views.score_note(run, score), gr.skip())


def picker_value(head) -> str:
    return "mean" if head == "mean" else f"H{head}"


def draw_attention(state, layer, head, mean, drop_first, log_scale):
    """The heatmap of one head (or the layer mean): (figure, head picker, status)."""
    try:
        run = current_run(state)
        picked = head_value(head, mean)
        figure = views.attention_figure(run, layer, picked, drop_first, log_scale)
    except Exception as err:
        return gr.skip(), gr.skip(), failure(err)
    return figure, picker_value(picked), gr.skip()


def draw_zoom(state, layer, head, mean, q0, q1, k0, k1):
    """Exact cells of a query/key window (inclusive ends) in the attention plot: (figure, status)."""
    try:
        run = current_run(state)
        layer, picked = views.check_layer_head(run, layer, head_value(head, mean))
        figure = attention.window_figure(run, layer, picked, (q0, q1), (k0, k1))
    except Exception as err:
        return gr.skip(), failure(err)
    return figure, gr.skip()


def draw_text(state, layer, head, mean, position, direction):
    """The text view shaded by the picked token's attention: (html, status)."""
    try:
        run = current_run(state)
        layer, picked = views.check_layer_head(run, layer, head_value(head, mean))
        text = attention.text_view_html(run, layer, picked, position, direction)
    except Exception as err:
        return gr.skip(), failure(err)
    return text, gr.skip()


def draw_layer(state, layer, drop_first, log_scale):
    """The layer's head grid, the head picker's choices and the ablation boxes: (grid, picker, boxes, status)."""
    try:
        run = current_run(state)
        grid = views.head_grid_figure(run, layer, drop_first, log_scale)
    except Exception as err:
        return gr.skip(), gr.skip(), gr.skip(), failure(err)
    views.warm_attention(run, int(layer), drop_first, log_scale)
    picker = gr.update(choices=head_choices(run.entry.config))
    boxes = gr.update(choices=intervene.heads_of_layer(run.entry.config, int(layer)), value=[])
    return grid, picker, boxes, gr.skip()


def head_choices(config) -> list[str]:
    """The head picker's choices: "mean", then "H0".."H{h-1}"."""
    return ["mean"] + [f"H{h}" for h in range(config.num_attention_heads)]


def draw_head(state, layer, head, drop_first, log_scale):
    """The head slider moved: draw that head and untick the mean box: (figure, picker, mean box, status)."""
    figure, picker, message = draw_attention(state, layer, head, False, drop_first, log_scale)
    return figure, picker, False, message


def pick_head(state, choice, layer, head, drop_first, log_scale):
    """A head picked beside the grid ("H3" or "mean", or a click on a panel): (figure, head slider, mean box, status)."""
    mean = choice in (None, "mean")
    head = head if mean else int(str(choice).lstrip("H"))
    figure, _, message = draw_attention(state, layer, head, mean, drop_first, log_scale)
    return figure, gr.skip() if mean else head, mean, message


def draw_overview(state, score):
    """The layer x head overview of one score: (figure, what the score means, status)."""
    try:
        run = current_run(state)
        return views.overview_figure(run, score), views.score_note(run, score), gr.skip()
    except Exception as err:
        return gr.skip(), gr.skip(), failure(err)


# ---------------------------------------------------------------- the other tabs


LENS_TAB = "Logit lens"


def draw_run_tabs(state):
    """After a generation: the mask, tokens and activations tabs, and the logit lens when its tab is open."""
    if not isinstance(state, BrowserState) or not state.fresh or state.run is None:
        return (gr.skip(),) * 8
    state.fresh = False
    try:
        run = state.run
        lens = views.logit_lens_figure(run) if state.tab == LENS_TAB else gr.skip()
        return (views.mask_html(run), lens, views.tokens_html(run), views.tokens_table(run),
                views.resid_norms_figure(run), views.mlp_figure(run), views.mlp_stats(run), gr.skip())
    except Exception as err:
        return (*(gr.skip(),) * 7, failure(err))


def draw_lens(state, lens_start):
    try:
        return views.logit_lens_figure(current_run(state), lens_start), gr.skip()
    except Exception as err:
        return gr.skip(), failure(err)


def tab_selected(state, lens_start, evt: gr.SelectData):
    """Remember the open tab; opening the logit lens draws it for the last run: (lens, status)."""
    if isinstance(state, BrowserState):
        state.tab = evt.value
    if evt.value != LENS_TAB or state is None or state.run is None:
        return gr.skip(), gr.skip()
    return draw_lens(state, lens_start)


# ---------------------------------------------------------------- intervene


def ablate(state, heads_text, ticked, mode, target):
    """Ablate heads and compare the next-token distribution: yields (top-10 table, summary, status).

    The forward needs the model's lock: while another user generates, the status says it waits.
    """
    try:
        run = current_run(state)
        heads = intervene.parse_heads(heads_text, ticked)
    except Exception as err:
        yield gr.skip(), gr.skip(), failure(err)
        return
    yield from with_model(run.entry, 3, lambda: ablation_outputs(run, heads, mode, target))


def ablation_outputs(run, heads, mode, target) -> tuple:
    """(top-10 table, summary, status) of one ablation on the run's tokens."""
    try:
        result = intervene.run_ablation(run, heads, mode)
        token = intervene.target_token(run, target, fallback=int(result.clean.argmax()))
        change = intervene.token_change(result, token, run.entry.tokenizer)
    except Exception as err:
        return gr.skip(), gr.skip(), failure(err)
    names = ", ".join(f"L{layer}H{head}" for layer, head in heads)
    summary = (f"**{mode}-ablated {names}.** Tracked token `{change['token']}` (id {change['id']}): "
               f"logit {change['logit before']:.3f} → {change['logit after']:.3f} "
               f"(difference {change['logit difference']:+.3f}); p {change['p before']:.3g} → {change['p after']:.3g}. "
               f"KL(before ‖ after) = {change['kl']:.4f} nats.")
    return intervene.top_table(result, run.entry.tokenizer), summary, status(f"Ablated {names} ({mode}).", "ok")


# ---------------------------------------------------------------- export


def view_options(layer, head, mean, drop_first, log_scale, score, lens_start) -> export.ViewOptions:
    return export.ViewOptions(int(layer), head_value(head, mean), bool(drop_first), bool(log_scale), score,
                              None if lens_start is None else int(lens_start))


def export_figure(state, which, fmt, layer, head, mean, drop_first, log_scale, score, lens_start):
    """The chosen figure as PNG or HTML: (file, status)."""
    try:
        options = view_options(layer, head, mean, drop_first, log_scale, score, lens_start)
        path = export.export_figure(current_run(state), which, fmt, options)
    except Exception as err:
        return gr.skip(), failure(err)
    return str(path), status(f"Saved {path.name}: download it below.", "ok")


def export_png(state, which, *options):
    return export_figure(state, which, "png", *options)


def export_html(state, which, *options):
    return export_figure(state, which, "html", *options)


def export_cache(state):
    try:
        path = export.export_cache(current_run(state))
    except Exception as err:
        return gr.skip(), failure(err)
    return str(path), status(f"Saved {path.name} ({path.stat().st_size / 2**20:.1f} MiB): "
                             "ActivationCache.load(path) reads it back.", "ok")


def export_view(state, layer, head, mean, drop_first, log_scale, score, lens_start):
    try:
        options = view_options(layer, head, mean, drop_first, log_scale, score, lens_start)
        path = export.export_view(current_run(state), options)
    except Exception as err:
        return gr.skip(), failure(err)
    return str(path), status(f"Saved {path.name}: llamaviz.notebook.open_view(path) reopens it.", "ok")
