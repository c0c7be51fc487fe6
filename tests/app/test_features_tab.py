"""The Features tab's handlers on the default model, each number against plain hooks on the model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from llamaviz import features
from llamaviz.app import features as fx, features_tab, models, state as app_state
from llamaviz.features import dashboards
from llamaviz.features.dictionary import Dictionary, DictionaryConfig
from test_handlers import is_error, run_generate

pytestmark = pytest.mark.slow
HOOK = "blocks.10.hook_resid_post"


@pytest.fixture(scope="module")
def session(default_gguf, tmp_path_factory):
    path = str(default_gguf)
    state = app_state.BrowserState()
    outputs = run_generate(state, path, "The cat sat on the mat. The dog sat on the", max_new_tokens=4)
    assert not is_error(outputs[-1][1])
    torch.manual_seed(5)
    sae = Dictionary(DictionaryConfig("topk", d_in=576, d_sae=1152, hook_name=HOOK, k=24))
    with torch.no_grad():
        sae.W_dec.normal_(0, 0.05)
        sae.W_enc.copy_(sae.W_dec.T * 4)
    folder = features.save(sae, tmp_path_factory.mktemp("sae") / "sae")
    entry = models.REGISTRY.get(path)
    dashboards.build(entry.model, features.load(folder), state.run.ids, folder)
    return state, str(folder), entry, features.load(folder)


def plain_acts(entry, run, sae) -> torch.Tensor:
    with torch.no_grad():
        _, cache = entry.model.run_with_cache(run.ids, names_filter=[HOOK])
        return sae.encode(cache[HOOK])[0]  # [T, F]


def test_show_lists_the_active_features_and_their_dashboard(session):
    state, folder, entry, sae = session
    shown_page = features_tab.show(state, folder, -1, 0)
    listing, feature, text, board = (shown_page[k] for k in ("feature_list", "feature_index", "feature_text",
                                                             "feature_dashboard"))
    assert not is_error(shown_page.get("status")), shown_page.get("status")
    acts = plain_acts(entry, state.run, sae)[-1]
    expected = acts.topk(fx.TOP_FEATURES).indices.tolist()
    shown = [int(f) for f in re.findall(r'data-feature="(\d+)"', listing)]
    assert shown == [f for f in expected if acts[f] > 0]
    assert feature == shown[0] and f"Feature {feature}" in board and "Top contexts" in board
    assert text.count("data-pos=") == state.run.ids.shape[1]


def test_ablation_matches_removing_the_features_decoder_rows_by_hand(session):
    state, folder, entry, sae = session
    acts = plain_acts(entry, state.run, sae)
    chosen = acts[-2].topk(2).indices.tolist()
    result = features_tab.ablate(state, folder, ", ".join(map(str, chosen)), "", -2)
    page = result["feature_ablation"]

    def by_hand(x, hook):
        return x - sae.encode(x)[..., chosen] @ sae.W_dec[chosen]

    with torch.no_grad():
        logits = entry.model.run_with_hooks(state.run.ids, return_type="logits", fwd_hooks=[(HOOK, by_hand)])[0, -2]
        plain = entry.model(state.run.ids, return_type="logits")[0, -2]
    answer = int(state.run.ids[0, -1])
    assert f"logit {plain[answer].item():.3f} -> {logits[answer].item():.3f}" in page


def test_attribution_puts_the_exact_ablation_beside_the_estimate(session):
    state, folder, entry, sae = session
    rows = fx.attribution(state.run, folder, -2, exact=2)
    answer = int(state.run.ids[0, -1])
    with torch.no_grad():
        plain = entry.model(state.run.ids, return_type="logits")[0, -2, answer]
        for row in rows[:2]:
            def by_hand(x, hook, row=row):
                acts = sae.encode(x)
                x = x.clone()
                x[0, row["position"]] -= acts[0, row["position"], row["feature"]] * sae.W_dec[row["feature"]]
                return x

            edited = entry.model.run_with_hooks(state.run.ids, return_type="logits",
                                                fwd_hooks=[(HOOK, by_hand)])[0, -2, answer]
            assert abs(row["exact"] - (plain - edited).item()) < 1e-3
    assert abs(rows[0]["estimate"]) >= abs(rows[-1]["estimate"])


def test_steering_adds_the_decoder_row_while_generating(session):
    state, folder, entry, sae = session
    plain, pushed = fx.steered(state.run, folder, 3, 40.0, state.run.prompt_length - 1, new_tokens=6)
    prompt = state.run.ids[:, :state.run.prompt_length]
    direction = 40.0 * sae.W_dec[3].detach()

    def add(x, hook):
        if x.shape[1] > 1:
            x = x.clone()
            x[:, -1:] += direction
            return x
        return x + direction

    with torch.no_grad(), entry.model.hooks(fwd_hooks=[(HOOK, add)]):
        expected = entry.model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert pushed == entry.tokenizer.decode(expected[0, prompt.shape[1]:].tolist()) and pushed != plain


def test_bad_input_is_shown_and_exports_are_written(session, tmp_path):
    state, folder, _, sae = session
    message = features_tab.steer(state, folder, sae.cfg.d_sae + 5, 4.0, 0)["status"]
    assert is_error(message) and "accepted: 0..1151" in message
    message = features_tab.ablate(state, folder, "twelve", "", -1)["status"]
    assert is_error(message) and "whole numbers" in message
    message = features_tab.show(state, str(tmp_path / "nothing"), -1, 0)["status"]
    assert is_error(message) and "no dictionary folder" in message
    exported = features_tab.export(state, folder, -1, 3)["feature_file"]
    assert json.loads(Path(exported).read_text())["feature"] == 3


def test_activations_and_dictionaries_count_in_the_live_runs_budget(session, tmp_path, monkeypatch):
    state, folder, entry, sae = session
    acts = fx.activations(state.run, folder)
    dense = plain_acts(entry, state.run, sae)
    assert torch.equal(acts.row(dense.shape[0] - 1), dense[-1]) and torch.equal(acts.column(7), dense[:, 7])
    key = ("feature-acts", str(Path(folder).resolve()))
    expected = sum(t.numel() * t.element_size() for t in acts[:3]) + 64 + 8 * 4  # payload.json_bytes of the tuple
    assert state.run.memo[key][1] == expected and state.run.memo_bytes >= expected
    weights = sum(t.numel() * t.element_size() for t in fx.dictionary(folder).state_dict().values())
    held = sum(e.nbytes() for e in fx._LOADED.values())
    assert app_state.LIVE_RUNS.shared["feature dictionaries"] == held >= weights
    other = str(features.save(sae, tmp_path / "other"))
    monkeypatch.setattr(fx, "DICTIONARY_SHARE", app_state.LIVE_RUNS.max_bytes)  # room for one dictionary only
    fx.dictionary(other)
    assert list(fx._LOADED) == [str(Path(other).resolve())]
    assert app_state.LIVE_RUNS.shared["feature dictionaries"] == fx._LOADED[str(Path(other).resolve())].nbytes()


def test_promoted_tokens_come_from_the_dashboards_or_the_decoder_once(session, tmp_path):
    state, folder, entry, sae = session
    effects = (sae.W_dec.detach() * entry.model.model.norm.weight.detach()) @ entry.model.lm_head.weight.detach().T
    chosen = [0, 5, 9]
    expected = {f: effects[f].topk(3).indices.tolist() for f in chosen}
    assert fx.promoted(state.run, folder, chosen) == expected  # read from dashboards.safetensors
    bare = str(features.save(sae, tmp_path / "bare"))  # no dashboards: from the decoder, memoised
    assert fx.promoted(state.run, bare, chosen) == expected
    assert fx._loaded(bare).effects[entry.path].shape == (sae.cfg.d_sae, 3)


def test_dictionaries_are_found_in_the_checkpoints_folder_and_beside_the_checkpoint(tmp_path, monkeypatch):
    sae = Dictionary(DictionaryConfig("topk", d_in=8, d_sae=16, hook_name=HOOK, k=2))
    listed, beside = tmp_path / "listed", tmp_path / "elsewhere"
    features.save(sae, listed / "sae-a"), features.save(sae, beside / "sae-b")
    (beside / "model.gguf").write_bytes(b"")
    monkeypatch.setenv(models.MODEL_DIR_ENV, str(listed))
    monkeypatch.chdir(tmp_path)  # not the repository: nothing is looked up relative to the working directory
    assert fx.found_dictionaries(None) == [str(listed / "sae-a")]
    assert fx.found_dictionaries(str(beside / "model.gguf")) == [str(beside / "sae-b"), str(listed / "sae-a")]


def test_search_ranks_the_features_firing_on_a_word_as_plain_hooks_do(session):
    state, folder, entry, sae = session
    run, tok = state.run, entry.tokenizer
    positions = [t for t, i in enumerate(run.ids[0].tolist()) if tok.decode([i]).strip().lower() == "sat"]
    assert len(positions) == 2
    best = plain_acts(entry, run, sae)[positions].max(0).values  # [F]
    expected = [f for f in best.topk(fx.TOP_FEATURES).indices.tolist() if best[f] > 0]
    page = features_tab.search_word(state, folder, " Sat ", -1)["feature_search_results"]
    assert [int(f) for f in re.findall(r'data-feature="(\d+)"', page)] == expected
    found, rows = fx.features_on(run, folder, "sat", -1)
    assert found == positions and [round(a, 4) for _, a, _ in rows] == [round(float(best[f]), 4) for f in expected]
    _, picked = fx.features_on(run, folder, "", positions[0])  # empty: the picked token alone
    at = plain_acts(entry, run, sae)[positions[0]]
    assert [f for f, _, _ in picked] == [f for f in at.topk(fx.TOP_FEATURES).indices.tolist() if at[f] > 0]
    shown = features_tab.search_word(state, folder, "zebra", -1)
    assert is_error(shown["status"]) and "'zebra' is not in the run's text" in shown["feature_search_results"]


def test_search_ranks_the_features_promoting_a_token_by_their_logit_effect(session):
    state, folder, entry, sae = session
    model = entry.model
    effects = (sae.W_dec.detach() * model.model.norm.weight.detach()) @ model.lm_head.weight.detach().T  # [F, v]
    token = entry.tokenizer.get_vocab()["Ġmat"]
    expected = effects[:, token].topk(fx.TOP_FEATURES)
    page = features_tab.search_token(state, folder, " mat")["feature_search_results"]
    assert [int(f) for f in re.findall(r'data-feature="(\d+)"', page)] == expected.indices.tolist()
    got, rows = fx.promoting(state.run, folder, "Ġmat")  # the raw vocabulary piece names the same token
    assert got == token
    torch.testing.assert_close(torch.tensor([e for _, e, _ in rows]), expected.values, rtol=1e-4, atol=1e-5)
    shown = features_tab.search_token(state, folder, "xqzptlwv")
    assert is_error(shown["status"]) and "not one token of the vocabulary" in shown["feature_search_results"]
