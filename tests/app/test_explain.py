"""The workbench tabs' handlers without a server, on the default model: every number shown equals the
library call on the same tokens (readouts, attribution, flow, patching, steering) or a brute-force hook."""

from __future__ import annotations

import html
import json
import re
import threading

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from llamaviz import attribution, flow, patching, readouts
from llamaviz.app import compare, handlers, models, state as app_state, views, workbench as wb
from llamaviz.run.generation import generate
from llamaviz.interpret.interventions import steer
from llamaviz.notebook import open_patching

PROMPT = "The capital of France is"
CORRUPTED = "The capital of Italy is"


def quiet(*args, **kwargs):
    """A stand-in for gr.Progress outside a request."""


def is_error(page) -> bool:
    return isinstance(page, str) and "lv-error" in page


@pytest.fixture(scope="module")
def entry(default_gguf):
    return models.REGISTRY.get(str(default_gguf))


@pytest.fixture(scope="module")
def session(default_gguf, entry):
    """A browser state after a greedy 2-token generation of PROMPT (no chat template)."""
    state = app_state.BrowserState()
    outputs = list(handlers.generate(state, str(default_gguf), PROMPT, False, 2, 1.0, 0, 1.0, 0, False,
                                     progress=quiet))
    assert not is_error(outputs[-1][1]), outputs[-1][1]
    return state


@pytest.fixture(scope="module")
def reference(session, entry):
    """run_with_cache of the run's cached positions with everything the explanations read, and full logits."""
    run = session.run
    with entry.lock, torch.no_grad():
        _, cache = entry.model.run_with_cache(run.ids[:, :-1], names_filter=readouts.explain_filter)
        logits = entry.model(run.ids).logits[0].float()  # [T, v]
    return cache, logits


def test_after_a_generation_the_picker_lists_the_tokens_and_the_last_one_is_explained(session, reference):
    bench = compare.Workbench()
    shown = wb.after_run(session, bench, "")
    update = shown["explain_token"]
    assert [index for _, index in update["choices"]] == list(range(1, len(session.run.tokens)))
    last = len(session.run.tokens) - 1
    assert update["value"] == last and "(generated)" in update["choices"][-1][0]
    expected = readouts.direct_logit_attribution(reference[0], last - 1, int(session.run.ids[0, last]))
    assert_close(torch.tensor(shown["dla"].data[0].y), expected.components.double(), atol=1e-4, rtol=1e-4)
    assert "status" not in shown  # the status line keeps the generation's report
    assert wb.after_run(session, bench, "") == {}  # a failed generation leaves the same run: nothing redrawn


def test_logit_attribution_shows_the_library_numbers_and_adds_up_to_the_logit(session, entry, reference):
    cache, logits = reference
    index, foil = 5, entry.model.to_single_token(" Rome")  # 5 = the generated " Paris"
    shown = wb.draw_dla(session, index, " Rome")
    assert not is_error(shown["status"]), shown["status"]
    token = int(session.run.ids[0, index])
    expected = readouts.direct_logit_attribution(cache, index - 1, token, foil)
    bars, heads, lens = shown["dla"].data
    assert_close(torch.tensor(bars.y), expected.components.double(), atol=1e-4, rtol=1e-4)
    assert_close(torch.tensor(np.asarray(heads.z)), expected.heads.double(), atol=1e-4, rtol=1e-4)
    assert_close(torch.tensor(lens.y), expected.accumulated.double(), atol=1e-4, rtol=1e-4)
    assert float(sum(bars.y)) == pytest.approx(float(logits[index - 1, token] - logits[index - 1, foil]), abs=1e-3)


def test_input_attribution_shows_integrated_gradients_scores(session, entry):
    index = 4  # " is": attributed to "The capital of France"
    shown = wb.draw_saliency(session, index, "integrated gradients")
    assert not is_error(shown["status"]), shown["status"]
    scores = [float(v) for v in re.findall(r'data-score="([^"]+)"', shown["saliency"])]
    run = session.run
    with entry.lock:
        result = attribution.integrated_gradients(entry.model, run.ids[:, :index], target=int(run.ids[0, index]),
                                                  steps=32)
    assert_close(torch.tensor(scores, dtype=torch.float64), result.scores[0].double(), atol=1e-3, rtol=1e-4)
    change = float(result.value[0] - result.baseline_value[0])
    gap = abs(float(result.scores.sum()) - change) / abs(change)
    assert f"f(input) − f(baseline) is {change:.4f} (gap {gap:.1%})" in shown["saliency"]
    assert ("Not converged" in shown["saliency"]) == (gap > 0.01)  # from zero embeddings SmolLM2 is far from it


def test_information_flow_shows_the_library_graph_and_what_an_edge_writes(session, entry, reference):
    cache = reference[0]
    shown = wb.draw_flow(session, 5, 0.05)
    assert not is_error(shown["status"]), shown["status"]
    graph = flow.information_flow(cache, 4, 0.05)
    edge_markers = shown["flow"].data[-2]
    assert sorted(edge_markers.customdata) == list(range(len(graph.edges)))
    strongest = max(range(len(graph.edges)), key=lambda i: graph.edges[i].share)
    detail = wb.flow_pick(session, 5, 0.05, f"edge:{strongest}")["flow_detail"]
    model = entry.model
    vector = flow.edge_vector(cache, graph.edges[strongest])
    logits = (model.lm_head.weight * model.model.norm.weight).float() @ vector  # [v]: W_U with the norm weight
    top = float(logits.max())
    assert f"{top:+.2f}" in detail


def test_attribution_patching_shows_the_library_estimate_normalised(session, entry):
    bench = compare.Workbench()
    shown = wb.run_patching(session, bench, CORRUPTED, " Paris", " Rome", "attribution", progress=quiet)
    assert not is_error(shown["status"]), shown["status"]
    model, paris, rome = entry.model, entry.model.to_single_token(" Paris"), entry.model.to_single_token(" Rome")
    clean, bad = session.run.ids[:, :5], model.to_tokens(CORRUPTED)
    metric = lambda logits: (logits[:, -1, paris] - logits[:, -1, rome]).mean()  # noqa: E731
    with entry.lock, torch.no_grad():
        clean_diff, bad_diff = float(metric(model(clean).logits)), float(metric(model(bad).logits))
    with entry.lock:
        estimate = patching.attribution_patch(model, clean, bad, metric, names=["resid_pre", "attn_head_out_all_pos"])
    assert f"clean logit difference {clean_diff:.3f}, corrupted {bad_diff:.3f}" in shown["patch_summary"]
    resid_pre = np.asarray(shown["patch_blocks"].data[0].z)
    assert_close(torch.tensor(resid_pre), estimate["resid_pre"].double() / (clean_diff - bad_diff), atol=1e-4, rtol=1e-3)
    assert_close(torch.tensor(np.asarray(shown["patch_heads"].data[0].z)),
                 estimate["attn_head_out_all_pos"].double() / (clean_diff - bad_diff), atol=1e-4, rtol=1e-3)


def test_exact_patching_cells_equal_brute_force_hooks(session, entry):
    bench = compare.Workbench()
    seen = []
    compare.run_patching(bench, session.run, CORRUPTED, " Paris", " Rome", "exact",
                         progress=lambda share, text: seen.append(share), sweeps=("resid_pre",))
    result, model = bench.result, entry.model
    assert seen[-1] == 1.0 and len(seen) > 3
    clean, bad = result.clean_ids, result.corrupted_ids
    with entry.lock, torch.no_grad():
        _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
        for layer, position in [(0, 3), (10, 3), (29, 4)]:
            name = f"blocks.{layer}.hook_resid_pre"

            def hook(x, hook, position=position, name=name):
                x = x.clone()
                x[:, position] = clean_cache[name][:, position]
                return x

            with model.hooks(fwd_hooks=[(name, hook)]):
                logits = model(bad).logits
            diff = float(logits[0, -1, result.answer] - logits[0, -1, result.wrong])
            expected = (diff - result.corrupted_diff) / (result.clean_diff - result.corrupted_diff)
            assert float(result.exact["resid_pre"][layer, position]) == pytest.approx(expected, abs=1e-3)
    figure = compare.block_figure(bench, "exact")
    assert [t.name for t in figure.data] == ["resid_pre (exact)"]  # exact mode: only the sweeps that ran


def test_stop_ends_a_sweep_and_two_pages_keep_their_own_results(session):
    bench = compare.Workbench()

    def press_stop(share, desc=None):
        bench.stop.set()  # as the Stop button does, from another request

    shown = wb.run_patching(session, bench, CORRUPTED, " Paris", " Rome", "exact", progress=press_stop)
    assert "Stopped" in shown["status"] and bench.result is None and not bench.running
    pages = {text: compare.Workbench() for text in (CORRUPTED, "The capital of Spain is")}
    threads = [threading.Thread(target=wb.run_patching, args=(session, bench, text, " Paris", " Rome", "attribution"),
                                kwargs={"progress": quiet}) for text, bench in pages.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for text, bench in pages.items():
        assert bench.result is not None
        assert bench.result.corrupted_ids[0].tolist() == session.run.entry.model.to_tokens(text)[0].tolist()
    assert pages[CORRUPTED].result.corrupted_diff != pages["The capital of Spain is"].result.corrupted_diff


def test_side_by_side_shows_both_patterns_and_their_difference(session, entry):
    bench = compare.Workbench()
    compare.run_patching(bench, session.run, CORRUPTED, " Paris", " Rome", "attribution")
    shown = wb.draw_diff(session, bench, 3, 1)
    with entry.lock, torch.no_grad():
        _, a = entry.model.run_with_cache(bench.result.clean_ids)
        _, b = entry.model.run_with_cache(bench.result.corrupted_ids)
    clean, bad, diff = (np.asarray(t.z) for t in shown["diff_attention"].data)
    assert_close(torch.tensor(diff), (a["pattern", 3][0, 1] - b["pattern", 3][0, 1]).double(), atol=1e-5, rtol=1e-5)
    lens = np.asarray(shown["diff_lens"].data[0].z)
    assert lens[-1, -1] == pytest.approx(bench.result.clean_diff, abs=1e-3)


def test_export_writes_the_results_and_the_notebook_reopens_them(session):
    bench = compare.Workbench()
    compare.run_patching(bench, session.run, CORRUPTED, " Paris", " Rome", "attribution")
    shown = wb.export_patching(session, bench)
    weights, info = shown["patch_file"]
    reopened = open_patching(info)
    assert reopened["clean_tokens"] == bench.tokens and reopened["answer"] == bench.result.answer
    assert_close(reopened["maps"]["attribution.heads"], bench.result.attribution["heads"])
    for fmt in ("png", "html"):
        saved = wb.export_analysis(session, bench, "patching heads", fmt, 5, "", 0.04, "attribution")
        assert saved["analysis_file"].endswith(f".{fmt}"), saved["status"]
    html_page = wb.export_analysis(session, bench, "logit attribution", "html", 5, "", 0.04, "both")
    assert "plotly" in open(html_page["analysis_file"], encoding="utf-8").read(2_000_000)


def test_steering_output_equals_generating_with_the_library_hook(session, entry):
    shown = wb.run_steer(session, "contrast prompts", 6, 8.0, "Italy", "France", "", None)
    assert not is_error(shown["status"]), shown["status"]
    model, tok, run = entry.model, entry.tokenizer, session.run
    with entry.lock, torch.no_grad():
        _, plus = model.run_with_cache(tok("Italy", return_tensors="pt")["input_ids"])
        _, minus = model.run_with_cache(tok("France", return_tensors="pt")["input_ids"])
        vector = plus["blocks.6.hook_resid_pre"][0, -1] - minus["blocks.6.hook_resid_pre"][0, -1]
        with model.hooks(fwd_hooks=steer(6, vector, 8.0, hook="hook_resid_pre")):
            steered = generate(model, run.ids[:, :5], max_new_tokens=2)
    text = tok.decode(steered[0, 5:].tolist(), skip_special_tokens=True)
    columns = re.findall(r"<pre[^>]*>(.*?)</pre>", shown["steer_output"], re.S)
    assert [html.unescape(c) for c in columns] == [run.continuation, text]
    assert text != run.continuation


@pytest.mark.parametrize("call, message", [
    (lambda s, b: wb.run_patching(s, b, "The capital of the Italy is", " Paris", " Rome", "both", progress=quiet),
     "same token length.*capital.*the.*Italy"),
    (lambda s, b: wb.run_patching(s, b, CORRUPTED, " Parisian", " Rome", "both", progress=quiet),
     "is 2 tokens.*type its first token"),
    (lambda s, b: wb.run_patching(s, b, "  ", " Paris", " Rome", "both", progress=quiet), "corrupted prompt is empty"),
    (lambda s, b: wb.run_steer(s, "contrast prompts", 99, 1, "a", "b", "", None), "layer must be a whole number in 0..29"),
    (lambda s, b: wb.run_steer(s, "contrast prompts", 3, "inf", "a", "b", "", None), "finite number"),
    (lambda s, b: wb.run_steer(s, "head output", 3, 1, "", "", "99.1", None), "layer 99"),
    (lambda s, b: wb.draw_dla(app_state.BrowserState(), None, None), "Generate first"),
    (lambda s, b: wb.draw_dla(s, 0, None), "cannot be explained"),
])
def test_bad_input_is_a_message_in_the_page(session, call, message):
    shown = call(session, compare.Workbench())
    assert is_error(shown["status"]) and re.search(message, json.dumps(shown["status"]).replace("&#x27;", "'")), shown


def test_a_clicked_token_is_picked_and_explained(session, reference):
    shown = wb.pick_clicked(session, "3:1700000000000", "")
    assert shown["explain_token"] == 3 and not is_error(shown["status"])
    expected = readouts.direct_logit_attribution(reference[0], 2, int(session.run.ids[0, 3]))
    assert_close(torch.tensor(shown["dla"].data[0].y), expected.components.double(), atol=1e-4, rtol=1e-4)
    wb.draw_flow(session, 5, 0.05)
    node = wb.flow_clicked(session, 5, 0.05, "node:30:4:1700000000000")["flow_detail"]
    assert "final" in node and "promotes" in node


def test_one_activation_from_the_corrupted_run(session, entry):
    bench = compare.Workbench()
    compare.run_patching(bench, session.run, CORRUPTED, " Paris", " Rome", "attribution")
    shown = wb.patch_one(session, bench, "blocks.0.hook_resid_pre", "3")
    r = bench.result
    # patching all of resid_pre at layer 0 from the corrupted run gives the corrupted run's logit difference
    whole = wb.patch_one(session, bench, "blocks.0.hook_resid_pre", "")["patch_one_result"]
    assert f"logit difference {r.corrupted_diff:.3f}" in whole
    model, name = entry.model, "blocks.0.hook_resid_pre"
    with entry.lock, torch.no_grad():
        _, bad = model.run_with_cache(r.corrupted_ids, names_filter=[name])

        def hook(x, hook):
            x = x.clone()
            x[:, 3] = bad[name][:, 3]
            return x

        with model.hooks(fwd_hooks=[(name, hook)]):
            logits = model(r.clean_ids).logits
    assert f"logit difference {float(logits[0, -1, r.answer] - logits[0, -1, r.wrong]):.3f}" in shown["patch_one_result"]
    assert is_error(wb.patch_one(session, bench, "blocks.0.resid", "")["status"])
    assert is_error(wb.patch_one(session, bench, "blocks.0.hook_resid_pre", "7")["status"])


def test_the_attention_tab_outlines_the_row_that_predicts_the_picked_token(session):
    shown = wb.highlight_attention(session, 5, 0, 0, False, False, False)["attention"]
    (shape,) = shown.layout.shapes
    assert (shape.y0, shape.y1) == (3.5, 4.5)  # token 5 is predicted at query position 4
    assert views.attention_figure(session.run, 0, 0).layout.shapes == ()  # the memoised figure is left alone


def test_a_head_output_steering_vector_is_that_head_through_its_slice_of_o_proj(session, entry, reference):
    from llamaviz.app import steer as app_steer

    vector = app_steer.steering_vector(session.run, "head output", 6, "", "", "3.1", 5)
    z = reference[0]["blocks.3.attn.hook_z"][0, 4, 1]  # [d]: head 1 at the position predicting token 5
    d = z.shape[-1]
    w_o = entry.model.model.layers[3].self_attn.o_proj.weight[:, d:2 * d]  # [m, d]
    assert_close(vector, (w_o @ z).float(), atol=1e-4, rtol=1e-4)


def test_after_a_chat_generation_the_picker_explains_the_last_token_that_is_not_special(default_gguf):
    from test_handlers import run_generate

    state = app_state.BrowserState()
    run_generate(state, str(default_gguf), "Say hi", chat_template=True, max_new_tokens=24)
    run = state.run
    shown = wb.after_run(state, compare.Workbench(), "")
    index = shown["explain_token"]["value"]
    special = set(run.entry.tokenizer.all_special_ids)
    assert run.ids[0, index].item() not in special and index >= run.prompt_length
    later = [i for i in range(index + 1, run.ids.shape[1]) if run.ids[0, i].item() not in special]
    assert not later  # the last such token
