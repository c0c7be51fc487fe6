"""The web app's handlers without a server, on the default model: each view checked against the
library call it stands for (generate, run_with_cache, analysis, logit_lens, a hand-written ablation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

import numpy as np
import pytest
import torch

from llamaviz import analysis
from llamaviz import plots
from llamaviz.app import attention, generating, handlers, models, state as app_state, views
from llamaviz.run.generation import generate as library_generate
from llamaviz.llama.activation_cache import ActivationCache
from llamaviz.notebook import read_view

PROMPT = "The cat sat on the mat. The cat sat on the"
NEW = 6
GREEDY = dict(chat_template=False, max_new_tokens=NEW, temperature=1.0, top_k=0, top_p=1.0, seed=0, do_sample=False)


def quiet(*args, **kwargs):
    """A stand-in for gr.Progress outside a request."""


def run_generate(state, path, prompt, **settings):
    """All yields of handlers.generate with GREEDY settings updated by `settings`."""
    s = {**GREEDY, **settings}
    return list(handlers.generate(state, path, prompt, s["chat_template"], s["max_new_tokens"], s["temperature"],
                                  s["top_k"], s["top_p"], s["seed"], s["do_sample"], progress=quiet))


def ablated(*inputs):
    """The last outputs of the Ablate handler (a generator: it may first say it waits for the model)."""
    return list(handlers.ablate(*inputs))[-1]


def is_error(html: str) -> bool:
    return isinstance(html, str) and "lv-error" in html


@pytest.fixture(scope="module")
def path(default_gguf) -> str:
    return str(default_gguf)


@pytest.fixture(scope="module")
def entry(path):
    return models.REGISTRY.get(path)


@pytest.fixture(scope="module")
def session(path, entry):
    """A browser state after one greedy generation of NEW tokens."""
    state = app_state.BrowserState()
    outputs = run_generate(state, path, PROMPT)
    assert not is_error(outputs[-1][1]), outputs[-1][1]
    return state, outputs


@pytest.fixture(scope="module")
def reference(session, entry):
    """run_with_cache on the same tokens, all patterns + residuals: what the stored activations must equal."""
    run = session[0].run
    with entry.lock, torch.no_grad():
        logits, cache = entry.model.run_with_cache(run.ids[:, :-1], names_filter=lambda name: name.endswith(
            ("attn.hook_pattern", "hook_resid_pre", "hook_resid_post", "mlp.hook_post", "attn.hook_z")))
        full_logits = entry.model(run.ids).logits[0].float()  # [T, v]
    return cache, full_logits


# ---------------------------------------------------------------- models and checkpoints


def test_checkpoint_list_puts_the_default_model_first_and_the_preselected_one_before_it(tmp_path, default_gguf):
    (tmp_path / "a-first.gguf").write_bytes(b"GGUF")
    (tmp_path / default_gguf.name).symlink_to(default_gguf)
    (tmp_path / "hf-model").mkdir()
    (tmp_path / "hf-model" / "config.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "empty-folder").mkdir()
    names = [label for label, _ in models.list_checkpoints(tmp_path)]
    assert names == [default_gguf.name, "a-first.gguf", "hf-model"]
    preselected = models.list_checkpoints(tmp_path, preselect=str(tmp_path / "hf-model"))
    assert [label for label, _ in preselected] == ["hf-model", default_gguf.name, "a-first.gguf"]


def test_a_model_is_loaded_once_even_when_asked_for_at_once():
    calls = []

    def loader(path, progress=None):
        calls.append(path)
        threading.Event().wait(0.2)
        return object(), object()

    registry = models.ModelRegistry(loader)
    entries = []
    threads = [threading.Thread(target=lambda: entries.append(registry.get("/x/model.gguf"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and all(e is entries[0] for e in entries)


def test_load_model_reports_a_broken_checkpoint_and_the_app_keeps_serving(tmp_path, path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\x03\x00\x00\x00 truncated")
    message, chat = handlers.load_model(str(broken), progress=quiet)
    assert is_error(message) and "broken.gguf" in message
    outputs = run_generate(app_state.BrowserState(), str(broken), PROMPT)
    assert is_error(outputs[-1][1])
    message, chat = handlers.load_model(path, progress=quiet)
    assert "Ready" in message and chat["value"] is True  # the instruct model has a chat template


# ---------------------------------------------------------------- generation


def test_generation_streams_the_prompt_then_the_library_greedy_continuation(session, entry):
    state, outputs = session
    run = state.run
    texts = [text for text, _, _ in outputs if isinstance(text, str)]
    assert texts[0] == PROMPT and texts[-1].startswith(PROMPT)
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))  # it only grows
    ids = torch.tensor([entry.tokenizer(PROMPT)["input_ids"]])
    expected = library_generate(entry.model, ids, max_new_tokens=NEW)
    assert torch.equal(run.ids, expected)
    continuation = entry.tokenizer.decode(expected[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    assert texts[-1] == PROMPT + continuation
    assert "Done" in outputs[-1][1]


def test_sampling_settings_reach_the_library_sampler(path, entry):
    state = app_state.BrowserState()
    sampling = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, seed=7)
    run_generate(state, path, PROMPT, **sampling)
    ids = torch.tensor([entry.tokenizer(PROMPT)["input_ids"]])
    expected = library_generate(entry.model, ids, max_new_tokens=NEW, **sampling)
    assert torch.equal(state.run.ids, expected)


def test_stored_activations_equal_run_with_cache_on_the_same_tokens(session, reference):
    run, (cache, _) = session[0].run, reference
    layers = run.entry.config.num_hidden_layers
    kept = {n for n in cache if n.endswith(("hook_pattern", "hook_resid_pre")) or n == f"blocks.{layers - 1}.hook_resid_post"}
    assert set(run.cache) == kept  # linear in T: lazy patterns, the residual stream once
    rope = 2 * len(run.cached_tokens) * run.entry.config.head_dim * 4  # cos and sin [1, T, d], shared by the layers
    assert run.cache.lazy is not None and run.cache.nbytes() == sum(cache[n].nbytes for n in kept if "resid" in n) + rope
    for name in ("blocks.0.attn.hook_pattern", "blocks.17.attn.hook_pattern", "blocks.29.hook_resid_post"):
        torch.testing.assert_close(run.cache[name], cache[name], atol=1e-3, rtol=1e-3)  # KV-cached vs one pass
    post = cache["post", 5][0].float()  # the MLP statistics were gathered while generating
    assert run.stats.mlp_rows()[5]["mean |post|"] == pytest.approx(post.abs().mean().item(), abs=2e-4)
    assert run.stats.mlp_rows()[5]["fraction > 0"] == pytest.approx((post > 0).float().mean().item(), abs=2e-4)
    torch.testing.assert_close(run.stats.z_mean(11), cache["z", 11][0].mean(0), atol=1e-4, rtol=1e-4)


def test_a_second_generation_replaces_the_first_and_frees_it(path):
    state = app_state.BrowserState()
    run_generate(state, path, "Hello", max_new_tokens=1)
    first = state.run
    outputs = run_generate(state, path, "Hello again", max_new_tokens=1)
    assert "Done" in outputs[-1][1] and state.run is not first
    assert first.cache is None and state.run.cache is not None
    assert first not in app_state.LIVE_RUNS._runs and state.run in app_state.LIVE_RUNS._runs


def test_chat_template_wraps_the_prompt_as_a_user_turn(entry):
    ids, text = generating.encode_prompt(entry, "Hi there", chat_template=True)
    expected = entry.tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}],
                                                   add_generation_prompt=True, tokenize=False)
    assert text == expected
    assert ids[0].tolist() == entry.tokenizer(expected, add_special_tokens=False)["input_ids"]


def test_stop_ends_generation_early_and_keeps_what_was_made(path):
    state = app_state.BrowserState()
    stream = handlers.generate(state, path, PROMPT, False, 200, 1.0, 0, 1.0, 0, False, progress=quiet)
    outputs = [next(stream)]
    handlers.stop(state)
    outputs += list(stream)
    assert state.run.stopped and state.run.new_tokens < 200
    assert "Stopped" in outputs[-1][1]


def test_concurrent_generations_keep_their_own_tokens_and_activations(path, entry):
    prompts = ["One two three four", "Paris is the capital of"]
    states = [app_state.BrowserState() for _ in prompts]
    threads = [threading.Thread(target=run_generate, args=(s, path, p), kwargs={"max_new_tokens": 4})
               for s, p in zip(states, prompts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for state, prompt in zip(states, prompts):
        ids = torch.tensor([entry.tokenizer(prompt)["input_ids"]])
        assert torch.equal(state.run.ids[:, :ids.shape[1]], ids)
        with entry.lock:
            _, alone = entry.model.run_with_cache(state.run.ids[:, :-1], names_filter="blocks.3.attn.hook_pattern")
        torch.testing.assert_close(state.run.cache["pattern", 3], alone["pattern", 3], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("settings, message", [
    (dict(max_new_tokens=0), "max new tokens must be between 1 and 512"),
    (dict(max_new_tokens=10_000), "max new tokens must be between 1 and 512"),
    (dict(max_new_tokens=None), "max new tokens must be a number"),
    (dict(temperature=0), "temperature must be in (0, 5]"),
    (dict(top_p=1.5), "top-p must be in (0, 1]"),
    (dict(top_k=-3), "top-k must be an integer &gt;= 0"),
    (dict(seed=-1), "seed must be between 0"),
    (dict(seed=1.5), "seed must be a whole number"),
])
def test_out_of_range_settings_are_reported_in_the_status_line(path, settings, message):
    state = app_state.BrowserState()
    outputs = run_generate(state, path, PROMPT, **settings)
    assert len(outputs) == 1 and is_error(outputs[0][1]) and message in outputs[0][1]
    assert state.run is None


@pytest.mark.parametrize("prompt, message", [
    ("", "the prompt is empty"),
    ("   \n ", "the prompt is empty"),
    ("word " * 8300, "at most 8191 fit (the model&#x27;s context is 8192 tokens)"),
    ("x" * 200_000, "the app takes at most 100,000"),
])
def test_empty_and_overlong_prompts_are_reported(path, prompt, message):
    outputs = run_generate(app_state.BrowserState(), path, prompt)
    assert is_error(outputs[-1][1]) and message in outputs[-1][1]


def test_markup_in_a_prompt_is_escaped_wherever_html_is_built(path):
    markup = '<img src=x onerror="window.__xss=1">'
    state = app_state.BrowserState()
    outputs = run_generate(state, path, markup, max_new_tokens=2)
    assert outputs[-1][0].startswith(markup)  # the output box is a Textbox: shown as text
    tokens = views.tokens_html(state.run)
    assert "<img" not in tokens and "&lt;" in tokens  # "<" is a token of its own, shown escaped
    assert "<img" not in views.mask_html(state.run)
    assert "<img" not in handlers.status(f"prompt {markup}") and "&lt;img" in handlers.status(markup)


def test_views_without_a_run_ask_to_generate_first():
    for result in (handlers.draw_attention(None, 0, 0, False, False, False), handlers.draw_lens(None, None),
                   ablated(None, "1.1", [], "zero", ""), handlers.export_cache(None)):
        assert is_error(result[-1]) and "Generate first" in result[-1]


def test_out_of_range_layer_and_head_are_reported(session):
    state = session[0]
    assert "30 layers, 0..29" in handlers.draw_attention(state, 30, 0, False, False, False)[-1]
    assert "9 heads per layer, 0..8" in handlers.draw_attention(state, 0, 9, False, False, False)[-1]
    assert "9 heads per layer, 0..8" in ablated(state, "2.9", [], "zero", "")[-1]
    assert "cannot read" in ablated(state, "2.x", [], "zero", "")[-1]
    figure, _, status = handlers.draw_attention(state, 2.0, 1.0, False, False, False)  # sliders may send floats
    assert status == gr.skip() and figure.layout.title.text == handlers.draw_attention(
        state, 2, 1, False, False, False)[0].layout.title.text
    assert "layer must be an integer in 0..29, got 2.5" in handlers.draw_attention(state, 2.5, 0, False, False, False)[-1]


def test_runs_over_the_memory_budget_are_freed_oldest_first_and_say_so(path):
    older, newer = app_state.BrowserState(), app_state.BrowserState()
    run_generate(older, path, "Hello", max_new_tokens=1)
    run_generate(newer, path, "Hello there", max_new_tokens=1)
    budget = app_state.RunBudget(max_bytes=1)
    budget.add(older.run)
    budget.add(newer.run)
    assert older.run.cache is None and newer.run.cache is not None
    assert "freed" in handlers.draw_attention(older, 0, 0, False, False, False)[-1]
    assert not is_error(handlers.draw_attention(newer, 0, 0, False, False, False)[-1])


# ---------------------------------------------------------------- tabs


def test_attention_heatmap_shows_the_stored_pattern_of_the_chosen_head(session, reference):
    state, (cache, _) = session[0], reference
    figure, picker, _ = handlers.draw_attention(state, 17, 4, False, False, False)
    np.testing.assert_allclose(figure.data[0].z, cache["pattern", 17][0, 4].numpy(), atol=1e-5)
    assert picker == "H4"
    mean, picker, _ = handlers.draw_attention(state, 17, 4, True, False, False)
    np.testing.assert_allclose(mean.data[0].z, cache["pattern", 17][0].mean(0).numpy(), atol=1e-5)
    assert picker == "mean"


def test_head_grid_and_picker_follow_the_layer(session, reference):
    state, (cache, _) = session[0], reference
    grid, picker, boxes, _ = handlers.draw_layer(state, 12, False, False)
    assert len(grid.data) == 9
    np.testing.assert_allclose(grid.data[7].z, cache["pattern", 12][0, 7].numpy(), atol=1e-5)
    assert picker["choices"][0] == "mean" and len(picker["choices"]) == 10
    assert boxes["choices"] == [f"L12H{h}" for h in range(9)]
    figure, head, mean, _ = handlers.pick_head(state, "H6", 12, 0, False, False)
    assert (head, mean) == (6, False)
    np.testing.assert_allclose(figure.data[0].z, cache["pattern", 12][0, 6].numpy(), atol=1e-5)


@pytest.mark.parametrize("score, detector", [
    ("previous-token", lambda p, t: analysis.previous_token_scores(p)),
    ("induction", analysis.induction_scores),
    ("duplicate-token", analysis.duplicate_token_scores),
    ("sink", lambda p, t: analysis.sink_scores(p)),
    ("entropy", lambda p, t: analysis.head_entropy(p)),
])
def test_head_overview_equals_the_detectors_on_all_stacked_patterns(session, reference, score, detector):
    state, (cache, _) = session[0], reference
    figure, note, _ = handlers.draw_overview(state, score)
    expected = detector(analysis.stack_patterns(cache), state.run.ids[:, :-1])
    np.testing.assert_allclose(figure.data[0].z, expected.numpy(), atol=1e-5)
    assert note


def test_token_logprobs_equal_a_full_forward(session, reference):
    run, (_, full_logits) = session[0].run, reference
    logprobs, alternatives = views.token_logprobs(run)
    expected = torch.log_softmax(full_logits[:-1], -1).gather(-1, run.ids[0, 1:, None])[:, 0]
    assert torch.isnan(logprobs[0])
    torch.testing.assert_close(logprobs[1:], expected, atol=1e-4, rtol=1e-4)
    top = torch.softmax(full_logits[3], -1).topk(5)
    assert [p for _, p in alternatives[4]] == pytest.approx(top.values.tolist(), abs=1e-4)
    table = views.tokens_table(run)
    assert len(table) == len(run.tokens) and list(table["from"]).count("generated") == run.new_tokens


def test_logit_lens_is_cache_logit_lens_on_a_window(session, reference):
    cache, _ = reference
    figure = handlers.draw_lens(session[0], 2)[0]
    expected = cache.logit_lens(top_k=1)["top_probs"][:, 0, 2:2 + views.LENS_WIDTH, 0]
    np.testing.assert_allclose(figure.data[0].z, expected.numpy(), atol=1e-4)


def test_mask_tab_prints_the_causal_mask_of_every_token(session):
    run = session[0].run
    text = views.mask_html(run)
    rows = [line for line in text.splitlines() if line.count("■") + line.count("⬚") == len(run.tokens)]
    assert [row.count("■") for row in rows] == list(range(1, len(run.tokens) + 1))
    assert "&#x27;␣cat&#x27;" in text or "'␣cat'" in text  # rows read as text, as in the terminal
    assert "Ġ" not in text


def test_after_a_generation_every_view_is_drawn_once_and_an_error_stays_visible(session, path):
    state = session[0]
    state.fresh, state.tab = True, "Logit lens"
    shown = handlers.show_run(state, 40, 4, False, False, False, "sink")
    assert shown[0]["value"] == 29 and shown[0]["maximum"] == 29 and shown[1]["maximum"] == 8  # clamped
    assert shown[3].layout.title.text == "L29 H4" and shown[4]["value"] == "H4"
    tabs = handlers.draw_run_tabs(state)
    assert "■" in tabs[0] and tabs[1].layout.title.text.startswith("logit lens")
    assert not state.fresh and handlers.draw_run_tabs(state) == (gr.skip(),) * 8
    failed = app_state.BrowserState()
    run_generate(failed, path, "")  # an error: the views after it leave the page (and its message) alone
    assert handlers.show_run(failed, 0, 0, False, False, False, "sink") == (gr.skip(),) * 10


def test_the_logit_lens_is_drawn_when_its_tab_opens(session):
    state = session[0]
    lens, _ = handlers.tab_selected(state, 0, SimpleNamespace(value="Logit lens"))
    assert lens.layout.title.text.startswith("logit lens") and state.tab == "Logit lens"
    assert handlers.tab_selected(state, 0, SimpleNamespace(value="Mask")) == (gr.skip(), gr.skip())


def test_stop_without_a_generation_says_so():
    assert "Nothing is generating" in handlers.stop(app_state.BrowserState())


def test_activation_tabs(session, reference):
    state, (cache, _) = session[0], reference
    state.fresh = True
    outputs = handlers.draw_run_tabs(state)
    norms, mlp_table = outputs[4], outputs[6]
    expected = cache.accumulated_resid()[:, 0].norm(dim=-1)
    np.testing.assert_allclose(norms.data[0].z, expected.numpy(), rtol=1e-4)
    post = cache["post", 5][0]
    assert mlp_table["mean |post|"][5] == pytest.approx(post.abs().mean().item(), abs=1e-4)
    assert mlp_table["fraction > 0"][5] == pytest.approx((post > 0).float().mean().item(), abs=1e-4)


# ---------------------------------------------------------------- intervene


def test_zero_ablation_matches_a_hand_written_hook(session, entry):
    state = session[0]
    table, summary, message = ablated(state, "3.1", ["L5H7"], "zero", "")
    assert "Ablated L3H1, L5H7" in message

    def knock_out(head):
        def hook(z, hook):  # z [b, p, h, d]
            z = z.clone()
            z[:, :, head] = 0
            return z
        return hook

    ids = state.run.ids
    with entry.lock, torch.no_grad():
        clean = entry.model(ids).logits[0, -1].softmax(-1)
        with entry.model.hooks(fwd_hooks=[("blocks.3.attn.hook_z", knock_out(1)), ("blocks.5.attn.hook_z", knock_out(7))]):
            knocked = entry.model(ids).logits[0, -1].softmax(-1)
    np.testing.assert_allclose(table["p before"], clean.topk(10).values.numpy(), atol=1e-4)
    np.testing.assert_allclose(table["p after"], knocked.topk(10).values.numpy(), atol=1e-4)
    assert "logit" in summary and "KL" in summary


def test_ablation_tracks_a_chosen_token(session, entry):
    state = session[0]
    _, summary, message = ablated(state, "0.0 0.1 0.2", [], "mean", " mat")
    token = entry.tokenizer(" mat", add_special_tokens=False)["input_ids"][0]
    assert f"(id {token})" in summary and "mean" in message


# ---------------------------------------------------------------- export


def test_exports_png_html_cache_and_a_view_that_the_notebook_reads(session, entry, path):
    state = session[0]
    options = (3, 2, False, False, False, "induction", None)
    png, message = handlers.export_png(state, "attention", *options)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and "Saved" in message
    for which in ("head grid", "head overview", "logit lens", "tokens", "residual norms"):
        assert open(handlers.export_png(state, which, *options)[0], "rb").read(4) == b"\x89PNG"
    page = open(handlers.export_html(state, "head grid", *options)[0], encoding="utf-8").read()
    assert "<script src=\"http" not in page and "Plotly" in page  # plotly.js inlined: opens offline
    cache_file, _ = handlers.export_cache(state)
    loaded = ActivationCache.load(cache_file, model=entry.model)
    torch.testing.assert_close(loaded["pattern", 3], state.run.cache["pattern", 3])
    view_file, _ = handlers.export_view(state, *options)
    view = read_view(view_file)
    assert view["prompt"] == PROMPT and str(view["model"]) == path
    assert view["settings"]["layer"] == 3 and view["settings"]["head"] == 2
    assert json.loads(open(view_file).read())["token_ids"] == state.run.ids[0].tolist()


def test_exports_are_private_and_a_planted_link_is_refused(session, tmp_path):
    from llamaviz.app import files

    state = session[0]
    options = (0, 0, False, False, False, "entropy", None)
    view_file = Path(handlers.export_view(state, *options)[0])
    root = files.export_root()
    assert root.name.startswith(files.PREFIX) and view_file.is_relative_to(root)
    assert {oct(p.stat().st_mode & 0o777) for p in (root, view_file.parent)} == {"0o700"}
    assert oct(view_file.stat().st_mode & 0o777) == "0o600"
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    view_file.unlink()
    view_file.symlink_to(target)
    _, message = handlers.export_view(state, *options)
    assert is_error(message) and "refusing to write" in message and "symbolic link" in message
    assert target.read_text() == "keep me"
    cache_link = view_file.parent / f"activations-run{state.run.run_id}.safetensors"
    cache_link.unlink(missing_ok=True)
    cache_link.symlink_to(target)
    assert "refusing to write" in handlers.export_cache(state)[1] and target.read_text() == "keep me"
    view_file.unlink()
    cache_link.unlink()


EXPORTING_CHILD = r"""
import json, sys
from llamaviz.app import files, handlers
from llamaviz.app.state import BrowserState
state = BrowserState()
for _ in handlers.generate(state, sys.argv[1], sys.argv[2], False, 3, 1.0, 0, 1.0, 0, False,
                           progress=lambda *a, **k: None):
    pass
view, message = handlers.export_view(state, 0, 0, False, False, False, "entropy", None)
png, _ = handlers.export_png(state, "attention", 0, 0, False, False, False, "entropy", None)
print(json.dumps({"root": str(files.export_root()), "view": view, "png": png, "message": message}), flush=True)
sys.stdin.readline()  # hold the folder until the parent has looked at both
"""


def test_two_app_processes_export_into_their_own_folders_and_remove_them_at_exit(path, tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    prompts = ["The capital of France is", "Water boils at a temperature of"]
    children = [subprocess.Popen([sys.executable, "-c", EXPORTING_CHILD, path, prompt], env=env, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=Path(__file__).parents[2])
                for prompt in prompts]
    try:
        reports = [json.loads(child.stdout.readline()) for child in children]
        roots = [Path(r["root"]) for r in reports]
        assert roots[0] != roots[1] and all(root.parent == tmp_path for root in roots), reports
        views = [Path(r["view"]) for r in reports]
        assert views[0].name == views[1].name  # run numbers restart per process: the folders keep them apart
        assert [json.loads(v.read_text())["prompt"] for v in views] == prompts
        assert all(Path(r["png"]).is_file() for r in reports)
    finally:
        for child in children:
            child.communicate("\n", timeout=60)
    assert [child.returncode for child in children] == [0, 0]
    assert not any(root.exists() for root in roots)  # removed when the process exited


def test_two_generates_in_one_session_the_second_replaces_the_first(path):
    state = app_state.BrowserState()
    first = handlers.generate(state, path, PROMPT, False, 200, 1.0, 0, 1.0, 0, False, progress=quiet)
    next(first)  # the first Generate is running
    second = run_generate(state, path, PROMPT, max_new_tokens=NEW)  # stops the first, then runs fully
    rest = list(first)
    assert "Done:" in second[-1][1] and f"{NEW} new tokens" in second[-1][1]
    assert state.run.new_tokens == NEW and not state.run.stopped
    assert all(output is not state.run for output in rest)


@pytest.mark.parametrize("seed", [2**53 + 1, 2**63 - 1])
def test_large_seeds_arrive_exactly(seed):
    settings = app_state.Settings(seed=seed).checked()
    assert settings.seed == seed and type(settings.seed) is int


def test_seeds_as_floats_above_2_53_and_lone_surrogates_get_clear_errors(path):
    with pytest.raises(ValueError, match="came as a float above 2\\*\\*53"):
        app_state.Settings(seed=float(2**60)).checked()
    with pytest.raises(ValueError, match="seed must be between 0 and 2\\*\\*63 - 1; got 9223372036854775808"):
        app_state.Settings(seed=2**63).checked()
    message = run_generate(app_state.BrowserState(), path, "The cat \ud83d sat")[-1][1]
    assert is_error(message) and "lone surrogate" in message and "at character 8" in message


def test_views_of_a_finished_run_do_not_wait_for_the_model_lock(session, entry):
    """While another request holds the model (a generation), the lens, token log-probs and attention answer."""
    state = session[0]
    run = state.run
    for key in [k for k in run.memo if k[0] in ("lens", "lens-table", "logprobs", "tokens-figure")]:
        run.memo.pop(key)
    done = threading.Event()

    def browse():
        handlers.draw_lens(state, 0)
        views.tokens_html(run)
        handlers.draw_attention(state, 1, 2, False, False, False)
        done.set()

    with entry.lock:  # what a generation in another session holds
        threading.Thread(target=browse, daemon=True).start()
        assert done.wait(30), "a view of a finished run waited for the model lock"
        ablation = handlers.ablate(state, "1.1", [], "zero", "")
        assert "generation to finish with the model" in next(ablation)[-1]  # ablation runs the model: it waits
    assert "Ablated L1H1" in next(ablation)[-1]  # and answers once the lock is free


# ---------------------------------------------------------------- long texts


@pytest.fixture(scope="module")
def long_session(path, entry):
    """A generation on a prompt of about 700 tokens: the attention views pool."""
    state = app_state.BrowserState()
    prompt = " ".join(f"item {i} is {'red' if i % 3 else 'blue'}." for i in range(120))
    outputs = run_generate(state, path, prompt, max_new_tokens=2)
    assert not is_error(outputs[-1][1]), outputs[-1][1]
    run = state.run
    assert len(run.cached_tokens) > attention.ATTENTION_CELLS
    with entry.lock, torch.no_grad():
        _, cache = entry.model.run_with_cache(run.ids[:, :-1], names_filter="blocks.7.attn.hook_pattern")
    return state, cache["pattern", 7][0]  # [h, T, T]


def brute_force_pool(weights: np.ndarray, size: int) -> np.ndarray:
    rows = -(-weights.shape[0] // size)
    return np.array([[weights[i * size:(i + 1) * size, j * size:(j + 1) * size].max() for j in range(rows)]
                     for i in range(rows)])


def test_long_texts_pool_zoom_and_shade_the_text_with_exact_values(long_session):
    state, pattern = long_session
    n = pattern.shape[-1]
    figure, _, _ = handlers.draw_attention(state, 7, 3, False, False, False)
    size = -(-n // attention.ATTENTION_CELLS)
    np.testing.assert_allclose(np.asarray(figure.data[0].z), brute_force_pool(pattern[3].numpy(), size), atol=1e-4)
    assert "max over" in figure.layout.title.text and "–" in figure.data[0].y[0]
    zoom, status = handlers.draw_zoom(state, 7, 3, False, 600, 640, 0, 40)
    np.testing.assert_allclose(np.asarray(zoom.data[0].z), pattern[3, 600:641, :41].numpy(), atol=1e-4)
    assert zoom.data[0].y[0].startswith("600: ")
    text, _ = handlers.draw_text(state, 7, 3, False, 650, "attends to")
    assert text.count("data-pos=") == n and 'data-pos="650" class="lv-picked"' in text
    top = int(pattern[3, 650].argmax())
    assert f'title="{top}: weight {pattern[3, 650, top].item():.4f}"' in text
    reverse, _ = handlers.draw_text(state, 7, "mean", True, 5, "attended by")
    column = pattern.mean(0)[:, 5]
    assert f'title="{int(column.argmax())}: weight {column.max().item():.4f}"' in reverse
    grid, _, _, _ = handlers.draw_layer(state, 7, False, False)
    assert len(grid.data) == 9 and np.asarray(grid.data[0].z).shape[0] <= attention.GRID_CELLS
    _, status = handlers.draw_zoom(state, 7, 3, False, 600, n + 5, 0, 40)
    assert is_error(status) and f"outside the {n} positions" in status
    _, status = handlers.draw_text(state, 7, 3, False, n, "attends to")
    assert is_error(status) and f"0..{n - 1}" in status


def test_long_texts_export_the_pooled_figure_as_png_and_html(long_session):
    state, _ = long_session
    options = (7, 3, False, False, False, "entropy", None)
    png, message = handlers.export_png(state, "attention", *options)
    assert not is_error(message) and Path(png).read_bytes().startswith(b"\x89PNG")
    html, message = handlers.export_html(state, "attention", *options)
    assert not is_error(message) and Path(html).read_text().count("max over") >= 1


def test_short_texts_go_through_the_same_views_with_exact_cells(path, entry):
    """At pooling factor 1 the one attention path gives today's exact heatmap, grid, zoom and text view."""
    state = app_state.BrowserState()
    outputs = run_generate(state, path, PROMPT, max_new_tokens=2)
    assert not is_error(outputs[-1][1]), outputs[-1][1]
    run = state.run
    with entry.lock, torch.no_grad():
        _, cache = entry.model.run_with_cache(run.ids[:, :-1], names_filter="blocks.4.attn.hook_pattern")
    pattern = cache["pattern", 4][0]  # [h, T, T]
    n = pattern.shape[-1]
    assert n <= attention.ATTENTION_CELLS
    for head, drop_first, log_scale in ((2, False, False), ("mean", False, False), (2, True, False), (2, False, True)):
        figure, _, _ = handlers.draw_attention(state, 4, 0 if head == "mean" else head, head == "mean", drop_first,
                                               log_scale)
        exact = plots.attention_heatmap(pattern, run.cached_tokens, head=head, layer=4, drop_first=drop_first,
                                        log_scale=log_scale)
        np.testing.assert_allclose(np.asarray(figure.data[0].customdata, dtype=float),
                                   np.asarray(exact.data[0].customdata, dtype=float), atol=1e-6, equal_nan=True)
        assert list(figure.data[0].x) == list(exact.data[0].x) and list(figure.data[0].y) == list(exact.data[0].y)
    grid, _, _, _ = handlers.draw_layer(state, 4, False, False)
    exact_grid = plots.head_grid(pattern, run.cached_tokens, layer=4)
    for ours, theirs in zip(grid.data, exact_grid.data):
        np.testing.assert_allclose(np.asarray(ours.z, dtype=float), np.asarray(theirs.z, dtype=float), atol=1e-6)
    zoom, _ = handlers.draw_zoom(state, 4, 2, False, 3, n - 1, 0, 5)
    np.testing.assert_allclose(np.asarray(zoom.data[0].z), pattern[2, 3:n, :6].numpy(), atol=1e-6)
    text, _ = handlers.draw_text(state, 4, 2, False, n - 1, "attends to")
    top = int(pattern[2, n - 1].argmax())
    assert text.count("data-pos=") == n and f'title="{top}: weight {pattern[2, n - 1, top].item():.4f}"' in text
    png, message = handlers.export_png(state, "head grid", 4, 2, False, False, False, "entropy", None)
    assert not is_error(message) and Path(png).read_bytes().startswith(b"\x89PNG")


def test_the_status_line_follows_the_prompts_prefill_layer_by_layer(path, monkeypatch):
    """Before the first new token the status counts the layers the prompt's forward has passed."""
    monkeypatch.setattr(handlers, "STREAM_INTERVAL", 0.0)  # every update reaches the page
    outputs = run_generate(app_state.BrowserState(), path, PROMPT * 4, max_new_tokens=2)
    statuses = [out[1] for out in outputs if isinstance(out[1], str)]
    layers = models.REGISTRY.get(path).config.num_hidden_layers
    reading = [s for s in statuses if "Reading the" in s]
    assert reading and all(f"of {layers}" in s and "-token prompt: layer " in s for s in reading)
    counts = [int(s.split("layer ")[1].split(" of")[0]) for s in reading]
    assert counts == sorted(counts) and counts[-1] < layers
    after = statuses[statuses.index(reading[-1]) + 1:]
    assert after[0].startswith('<div class="lv-status lv-info">Generating: up to 2 tokens') and "Done" in after[-1]
