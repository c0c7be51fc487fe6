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
