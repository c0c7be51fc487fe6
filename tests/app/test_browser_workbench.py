"""The workbench tabs in a real browser (chromium + playwright, the app as a subprocess): the
indirect-object example end to end with the page's numbers checked against the library, Stop during
a sweep, two pages patching at once, markup in the corrupted prompt, and steering. The first test
saves assets/screenshot-patching.png for the README."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from llamaviz import readouts
from test_browser import (CHROMIUM, REPO, browser, open_page, open_tab, server, set_number,  # noqa: F401 (fixtures)
                          wait_for_status)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed (make browser installs it)"),
]
SCREENSHOT = REPO / "assets" / "screenshot-patching.png"
IOI = ("When Mary and John went to the store, John gave a drink to",
       "When Mary and John went to the store, Mary gave a drink to")


@pytest.fixture(scope="module")
def library(default_gguf):
    """The default model in the test process: the reference the page's numbers must equal."""
    import llamaviz

    model, tok = llamaviz.load(default_gguf)
    return model, tok


PLOT_DATA_JS = """([p, i, k]) => {
  const plain = a => ArrayBuffer.isView(a) ? Array.from(a) : Array.isArray(a) ? a.map(plain) : a;
  return plain(document.querySelector(p + ' .js-plotly-plot').data[i][k]);
}"""


def plot_data(page, plot: str, trace: int, key: str) -> np.ndarray:
    """One array of a drawn plotly trace, as the page holds it (typed arrays made plain, base64 decoded)."""
    value = page.evaluate(PLOT_DATA_JS, [plot, trace, key])
    if isinstance(value, dict) and "bdata" in value:  # plotly's binary encoding of numpy arrays
        array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        shape = [int(n) for n in shape.split(",")] if isinstance(shape, str) else shape
        return array.reshape(shape).astype(float) if shape else array.astype(float)
    return np.asarray(value, dtype=float)


def generate_example(page) -> None:
    """Load the indirect-object example (its button is on the Compare & patch tab) and generate one token."""
    open_tab(page, "Compare & patch")
    page.click("#ioi-example")
    page.wait_for_function("p => document.querySelector('#prompt textarea').value === p", arg=IOI[0])
    assert not page.is_checked("#chat-template input")
    set_number(page, "#max-new-tokens", 1)
    page.click("#generate")
    wait_for_status(page, "Done")
    open_tab(page, "Logit attribution")  # drawn after each generation: wait for it before the next step
    page.wait_for_function("() => (document.querySelector('#dla-plot .gtitle') || {}).textContent?.includes('Mary')")


def patch(page, mode: str, corrupted: str | None = None) -> None:
    open_tab(page, "Compare & patch")
    if corrupted is not None:
        page.fill("#corrupt-prompt textarea", corrupted)
    page.locator("#patch-mode").get_by_label(mode, exact=True).check()
    page.click("#patch-run")


def test_indirect_object_example_end_to_end(browser, server, library):
    model, tok = library
    page = open_page(browser, server, scale=0.8)
    generate_example(page)
    open_tab(page, "Logit attribution")
    page.wait_for_function("() => (document.querySelector('#dla-plot .gtitle') || {}).textContent"
                           "?.includes('Mary')")  # the last generated token, picked by default
    ids = tok(IOI[0] + " Mary", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        _, cache = model.run_with_cache(ids[:, :-1], names_filter=readouts.explain_filter)
    expected = readouts.direct_logit_attribution(cache, -1, int(ids[0, -1]))
    np.testing.assert_allclose(plot_data(page, "#dla-plot", 0, "y"), expected.components.numpy(), atol=2e-3)

    patch(page, "attribution")
    wait_for_status(page, "Patched")
    page.wait_for_selector("#patch-blocks .js-plotly-plot")
    page.wait_for_selector("#patch-heads .js-plotly-plot")
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
    from llamaviz import pairs

    result = pairs.patch_pair(model, ids[:, :-1], tok(IOI[1], return_tensors="pt")["input_ids"], mary, john,
                              exact=False)
    np.testing.assert_allclose(np.array(plot_data(page, "#patch-blocks", 0, "z")),
                               result.attribution["resid_pre"].numpy(), atol=2e-3)
    np.testing.assert_allclose(np.array(plot_data(page, "#patch-heads", 0, "z")),
                               result.attribution["heads"].numpy(), atol=2e-3)
    page.locator("#patch-blocks").scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    box = page.evaluate("""() => {  // the tab's controls and both heatmaps, in page coordinates
      const top = document.querySelector('#tab-compare').getBoundingClientRect();
      const bottom = document.querySelector('#patch-heads').getBoundingClientRect();
      return {x: top.left, y: top.top + window.scrollY, width: top.width, height: bottom.bottom - top.top};
    }""")
    page.screenshot(path=str(SCREENSHOT), full_page=True, clip=box)

    patch(page, "exact")  # Stop ends the sweep
    page.wait_for_selector(".progress-text, .progress-level, .eta-bar", timeout=60_000)
    page.click("#patch-stop")
    wait_for_status(page, "Stopped")
    page.context.close()


def test_two_pages_patching_at_once_get_their_own_results(browser, server):
    corrupted = {IOI[1]: None, "When Mary and John went to the store, Bob gave a drink to": None}
    pages = [open_page(browser, server) for _ in corrupted]
    for page in pages:
        generate_example(page)
    for page, text in zip(pages, corrupted):
        patch(page, "attribution", text)
    for page, text in zip(pages, corrupted):
        wait_for_status(page, "Patched")
        corrupted[text] = page.input_value("#patch-summary textarea")
        assert text.split(",")[1].split()[0] in page.input_value("#patch-tokens textarea")
        page.context.close()
    assert len(set(corrupted.values())) == 2


def test_markup_in_the_corrupted_prompt_is_shown_as_text(browser, server):
    page = open_page(browser, server)
    generate_example(page)
    patch(page, "attribution", "<b>bold</b> <img src=x onerror=\"window.hacked=1\">")
    text = wait_for_status(page, "same token length")
    assert "'<" in text and "img" in text  # the tokens of the markup, shown as text
    assert page.locator("#status b, #status img").count() == 0
    assert not page.evaluate("() => window.hacked === 1")
    page.context.close()


def test_steering_changes_the_continuation(browser, server):
    page = open_page(browser, server)
    page.fill("#prompt textarea", "The capital of France is")
    if page.is_checked("#chat-template input"):
        page.click("#chat-template input")
    set_number(page, "#max-new-tokens", 4)
    page.click("#generate")
    wait_for_status(page, "Done")
    open_tab(page, "Steer")
    page.fill("#steer-plus textarea", "Italy")
    page.fill("#steer-minus textarea", "France")
    page.fill("#steer-coefficient input", "8")
    page.click("#steer-run")
    wait_for_status(page, "Steered")
    plain, steered = page.locator("#steer-output pre").all_inner_texts()
    assert plain != steered
    page.context.close()
