"""The Features tab in a real browser: pick a dictionary by path, see the features, search them (by a word of
the text, by a promoted token), steer, and bad input shown in the page (the app stays up)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llamaviz import features
from llamaviz.features.dictionary import Dictionary, DictionaryConfig
from test_browser import browser, open_page, server, start_generation, wait_for_status  # noqa: F401

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SCREENSHOT = Path(__file__).resolve().parents[2] / "assets" / "screenshot-features.png"


@pytest.fixture(scope="module")
def sae_folder(tmp_path_factory) -> str:
    torch.manual_seed(2)
    sae = Dictionary(DictionaryConfig("topk", d_in=576, d_sae=1152, hook_name="blocks.10.hook_resid_post", k=24))
    with torch.no_grad():
        sae.W_dec.normal_(0, 0.05)
        sae.W_enc.copy_(sae.W_dec.T * 4)
    return str(features.save(sae, tmp_path_factory.mktemp("sae") / "sae"))


def open_features(page) -> None:
    """Click the Features tab, from the tabs' overflow menu when the row has no room for it."""
    tab = page.get_by_role("tab", name="Features")
    if tab.count() and tab.first.is_visible():
        tab.first.click()
        return
    page.click(".overflow-menu > button")
    page.locator(".overflow-dropdown button", has_text="Features").first.click()


def test_the_features_tab_shows_steers_and_reports_bad_input(browser, server, sae_folder):  # noqa: F811
    page = open_page(browser, server)
    start_generation(page, "The cat sat on the mat. The dog sat on the", max_new_tokens=4)
    wait_for_status(page, "Done")
    open_features(page)
    page.fill("#feature-dictionary input", sae_folder)
    page.press("#feature-dictionary input", "Enter")
    page.click("#feature-show")
    page.wait_for_selector("#feature-list table tr[data-feature]")
    assert page.locator("#feature-text span[data-pos]").count() > 10
    assert "No dashboards beside" in page.inner_text("#feature-dashboard")
    page.locator("#tab-features").screenshot(path=str(SCREENSHOT))  # README shows it
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
    page.fill("#feature-scale input", "40")
    page.click("#feature-steer")
    page.wait_for_selector("#feature-steered-text .lv-steer")
    assert "steered (feature" in page.inner_text("#feature-steered-text")
    page.fill("#feature-ablate-list textarea, #feature-ablate-list input", "twelve")
    page.click("#feature-ablate")
    assert "whole numbers" in wait_for_status(page, "whole numbers")
    page.click("#feature-show")  # still serving
    wait_for_status(page, "Features of the run")
