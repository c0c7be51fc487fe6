"""Feature dashboards: every number against a brute-force pass that holds all activations at once (read
with plain hooks: the hook's activation through the dictionary's encoder)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from llamaviz import features
from llamaviz.features import dashboards
from llamaviz.features.dictionary import Dictionary, DictionaryConfig
from tiny import hf_and_ours


class Tok:
    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    _, model = hf_and_ours("gqa")
    model.eval()
    torch.manual_seed(3)
    sae = Dictionary(DictionaryConfig("topk", d_in=64, d_sae=40, hook_name="blocks.1.hook_resid_post", k=5))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    windows = torch.randint(3, 113, (19, 12), generator=torch.Generator().manual_seed(4))
    folder = tmp_path_factory.mktemp("dash")
    dashboards.build(model, sae, windows, folder)
    with torch.no_grad():  # [n, p, F]: the brute force holds it all, from a plain cache of the whole forward
        _, cache = model.run_with_cache(windows, names_filter=[sae.cfg.hook_name])
        every = sae.encode(cache[sae.cfg.hook_name])
    return model, sae, windows, dashboards.DashboardFile(folder), every


def test_feature_acts_are_the_encoded_hook_input_and_what_the_attached_dictionary_shows(setup):
    model, sae, windows, _, every = setup
    assert_close(dashboards.feature_acts(model, sae, windows), every)
    name = f"{sae.cfg.hook_name}.hook_sae_acts_post"
    with torch.no_grad(), features.attached(model, sae, use_error_term=True):
        _, cache = model.run_with_cache(windows, names_filter=[name])
    assert_close(cache[name], every)


def test_density_peak_and_top_contexts_equal_the_brute_force(setup):
    model, sae, windows, file, every = setup
    flat = every.reshape(-1, sae.cfg.d_sae)
    fired = (flat > 0).sum(0)
    rarest = int(torch.where(fired > 0, fired, fired.max() + 1).argmin())  # fewer firing positions than TOP
    assert 0 < fired[rarest] < dashboards.TOP
    for feature in fired.argsort(descending=True)[:3].tolist() + [rarest]:
        data = file.feature(feature)
        assert_close(data["density"], (flat[:, feature] > 0).float().mean())
        assert_close(data["peak"], flat[:, feature].max())
        active = flat[:, feature][flat[:, feature] > 0].sort(descending=True).values[:dashboards.TOP]
        padded = torch.cat([active, torch.full((dashboards.TOP - len(active),), -1.0)])  # only where it fires
        assert_close(data["top_values"], padded)
        assert_close(flat[data["top_where"][:len(active)], feature], active)
        spot = int(data["top_where"][0])
        window, position = divmod(spot, windows.shape[1])
        centre = dashboards.RADIUS
        assert int(data["top_ids"][0, centre]) == int(windows[window, position])
        assert_close(data["top_acts"][0, centre], every[window, position, feature])
        left = max(0, position - dashboards.RADIUS)
        shown = data["top_ids"][0][data["top_ids"][0] >= 0]
        assert shown.tolist() == windows[window, left:position + dashboards.RADIUS + 1].tolist()
        assert_close(data["top_acts"][0][data["top_ids"][0] >= 0],
                     every[window, left:position + dashboards.RADIUS + 1, feature])


def test_histograms_and_interval_samples_equal_the_brute_force(setup):
    _, sae, windows, file, every = setup
    flat = every.reshape(-1, sae.cfg.d_sae)
    for feature in (flat > 0).sum(0).argsort(descending=True)[:2].tolist():
        data = file.feature(feature)
        values = flat[:, feature][flat[:, feature] > 0]
        bins = (values / values.max() * dashboards.BINS).ceil().clamp(1, dashboards.BINS).long() - 1
        assert data["histogram"].tolist() == torch.bincount(bins, minlength=dashboards.BINS).float().tolist()
        for interval in range(dashboards.INTERVALS):
            low, high = interval / dashboards.INTERVALS * values.max(), (interval + 1) / dashboards.INTERVALS * values.max()
            members = ((flat[:, feature] > low) & (flat[:, feature] <= high + 1e-6)).sum()
            chosen = data["sample_where"][interval][data["sample_valid"][interval]]
            assert len(chosen) == min(dashboards.SAMPLES, int(members))
            shown = data["sample_acts"].view(dashboards.INTERVALS, dashboards.SAMPLES, -1)[interval]
            for spot, acts in zip(chosen.tolist(), shown[data["sample_valid"][interval]]):
                assert low - 1e-6 < flat[spot, feature] <= high + 1e-5
                assert_close(acts[dashboards.RADIUS], flat[spot, feature])  # the context's centre


def test_logit_effects_are_the_decoder_through_norm_weight_and_unembedding(setup):
    model, sae, _, file, _ = setup
    effects = (sae.W_dec.detach() * model.model.norm.weight.detach()) @ model.lm_head.weight.detach().T
    data = file.feature(5)
    assert data["promoted_ids"].tolist() == effects[5].topk(10).indices.tolist()
    assert_close(data["suppressed_values"], effects[5].topk(10, largest=False).values)


def test_neuronpedia_export_and_bad_requests(setup, tmp_path):
    _, _, _, file, _ = setup
    path = dashboards.export_json(tmp_path / "f.json", file, [0, 3], Tok(), "tiny")
    exported = json.loads(path.read_text())
    assert [f["index"] for f in exported] == [0, 3] and exported[0]["layer"] == "blocks.1.hook_resid_post"
    assert len(exported[0]["pos_str"]) == 10 and len(exported[0]["freq_hist_data_bar_heights"]) == dashboards.BINS
    with pytest.raises(IndexError, match="accepted: 0..39"):
        file.feature(40)
    with pytest.raises(FileNotFoundError, match="no dashboards"):
        dashboards.DashboardFile(tmp_path / "nothing")
