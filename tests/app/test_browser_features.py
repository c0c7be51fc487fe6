"""The Features tab in a real browser on the default model with its default dictionary (sae-resid-15, from
model/dictionaries when `make dictionaries` built it, else a quick build by the same code on fewer tokens,
with its dashboards): choose it, see the features and a dashboard, search them (by a word of the text, by a
promoted token), steer, ablate, attribute, export, and bad input shown in the page (the app stays up)."""

from __future__ import annotations

from pathlib import Path

import json
import re
import shutil

import pytest

import llamaviz
from llamaviz.features import dashboards, defaults, load
from llamaviz.features.data import windows
from test_browser import browser, open_page, serving, start_generation, wait_for_status  # noqa: F401

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SCREENSHOT = Path(__file__).resolve().parents[2] / "assets" / "screenshot-features.png"


DEFAULT = "sae-resid-15"
QUICK_TOKENS = 8192  # the quick build: 8 steps of the default trainer, seconds; the real one reads 150,000


@pytest.fixture(scope="module")
def server(default_gguf, tmp_path_factory):
    """The app with the default model and its default dictionary (with dashboards) in its checkpoints folder."""
    folder = tmp_path_factory.mktemp("model")
    (folder / default_gguf.name).symlink_to(default_gguf)
    built = defaults.default_folder() / DEFAULT
    target = folder / "dictionaries" / DEFAULT
    model, tokenizer = llamaviz.load(default_gguf)
    if (built / "cfg.json").exists():
        shutil.copytree(built, target)
    else:
        defaults.build(model, folder / "dictionaries", tokens=QUICK_TOKENS, sae_layers=(15,), transcoders=False,
                       progress=False)
    if not (target / dashboards.FILE).exists():
        corpus = windows(tokenizer, defaults.python_docs(max_chars=60_000), 64, max_tokens=4096)
        dashboards.build(model, load(target), corpus, target)
    del model
    with serving(folder) as url:
        yield url


def open_features(page) -> None:
    """Click the Features tab, from the tabs' overflow menu when the row has no room for it."""
    tab = page.get_by_role("tab", name="Features")
    if tab.count() and tab.first.is_visible():
        tab.first.click()
        return
    page.click(".overflow-menu > button")
    page.locator(".overflow-dropdown button", has_text="Features").first.click()


def test_the_features_tab_with_the_default_dictionary(browser, server):  # noqa: F811
    page = open_page(browser, server)
    start_generation(page, "The cat sat on the mat. The dog sat on the", max_new_tokens=4)
    wait_for_status(page, "Done")
    open_features(page)
    page.click("#feature-dictionary input")
    page.get_by_role("option", name=re.compile(DEFAULT)).click()  # the dictionary choice lists it
    page.click("#feature-show")
    page.wait_for_selector("#feature-list table tr[data-feature]")
    listed = [int(f) for f in page.locator("#feature-list tr[data-feature]").evaluate_all(
        "rows => rows.map(r => r.dataset.feature)")]
    assert page.locator("#feature-text span[data-pos]").count() > 10
    page.fill("#feature-index input", str(listed[0]))
    page.click("#feature-show")
    page.wait_for_selector("#feature-dashboard :text('Top contexts')")  # built beside the dictionary
    assert f"Feature {listed[0]}" in page.inner_text("#feature-dashboard")
    page.locator("#tab-features").screenshot(path=str(SCREENSHOT))  # README shows it
    search(page)
    edit(page, listed)
    page.fill("#feature-ablate-list textarea, #feature-ablate-list input", "twelve")
    page.click("#feature-ablate")
    assert "whole numbers" in wait_for_status(page, "whole numbers")
    page.click("#feature-show")  # still serving
    wait_for_status(page, "Features of the run")


def search(page) -> None:
    box = "#feature-search textarea, #feature-search input"
    page.fill(box, "sat")
    page.click("#feature-search-word")
    page.wait_for_selector("#feature-search-results .lv-search tr[data-feature]")
    assert "Features firing most on 'sat'" in page.inner_text("#feature-search-results")
    page.fill(box, " mat")
    page.click("#feature-search-token")
    page.wait_for_selector("#feature-search-results :text('Features promoting')")
    assert page.locator("#feature-search-results tr[data-feature]").count() == 12
    page.fill(box, "zebra")
    page.click("#feature-search-word")
    page.wait_for_selector("#feature-search-results .lv-error")
    assert "'zebra' is not in the run's text" in page.inner_text("#feature-search-results")


def edit(page, listed: list[int]) -> None:
    """Steer, ablate and attribute with the listed features, then export what is shown."""
    page.fill("#feature-scale input", "40")
    page.click("#feature-steer")
    page.wait_for_selector("#feature-steered-text .lv-steer")
    assert f"steered (feature {listed[0]}" in page.inner_text("#feature-steered-text")
    page.fill("#feature-ablate-list textarea, #feature-ablate-list input", f"{listed[0]}, {listed[1]}")
    page.click("#feature-ablate")
    page.wait_for_selector("#feature-ablation :text('top after')")
    assert re.search(r"logit -?[\d.]+ -> -?[\d.]+", page.inner_text("#feature-ablation"))
    page.click("#feature-attribute")
    page.wait_for_selector("#feature-attribution table tr td")
    assert "exact ablation" in page.inner_text("#feature-attribution")
    assert len(page.locator("#feature-attribution tr").all()) > 2
    page.click("#feature-export")
    page.wait_for_selector("#feature-file a")
    with page.expect_download() as download:
        page.locator("#feature-file a").first.click()
    exported = json.loads(Path(download.value.path()).read_text())
    assert exported["feature"] == listed[0] and exported["attribution"]
